"""Storage: jobs, images, votes, users and guilds in SQL (SQLite or PostgreSQL), and image files on disk."""
