"""The web gallery: a thin aiohttp front door over the studio."""
