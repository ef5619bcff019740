"""The Discord bot: a thin front door over `studio` (slash commands, persistent buttons, reactions)."""
