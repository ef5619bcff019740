"""Starting the bot inside `dreamloom serve` (a front door, like the web gallery)."""
from __future__ import annotations

import asyncio
import logging

import discord
import yarl

from bot.client import DreamloomBot
from dreamloom.errors import ConfigError

log = logging.getLogger(__name__)


def point_at(api_base: str, gateway_url: str) -> None:
    """Send discord.py's REST calls and gateway connection to `api_base` / `gateway_url` (Discord or a double)."""
    discord.http.Route.BASE = api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


async def start_bot(studio, settings, announce=print, **options):
    """Connect the bot in the background; returns the coroutine function that disconnects it."""
    point_at(settings.discord_api_base, settings.discord_gateway_url)
    await studio.prepare_routing()  # Discord allows 3 seconds before the first reply: nothing heavy on the way
    bot = DreamloomBot(studio, settings, **options)
    try:
        await bot.login(settings.discord_token)  # a wrong token fails here, at start, with a clear message
    except discord.LoginFailure:
        await bot.close()
        raise ConfigError("Discord refused DISCORD_TOKEN; copy the bot token again from the Developer Portal.") from None
    runner = asyncio.create_task(bot.connect(reconnect=True))
    announce(f"dreamloom serve: Discord bot logged in as {bot.user} (application {bot.application_id})")

    async def stop() -> None:
        await bot.close()
        runner.cancel()
        try:
            await runner
        except (asyncio.CancelledError, Exception):
            pass

    stop.bot = bot  # tests and benchmarks reach the running client through the handle
    return stop
