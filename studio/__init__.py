"""Application services that the front doors (CLI, Discord bot, web gallery) call."""
