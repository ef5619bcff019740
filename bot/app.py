"""Starting the bot inside `dreamloom serve` (a front door, like the web gallery)."""
from __future__ import annotations

import asyncio
import logging

import aiohttp
import discord
import yarl

from bot.client import DreamloomBot
from dreamloom.errors import ConfigError

log = logging.getLogger(__name__)


RETRY_S = 30.0  # between attempts to reach Discord when it was unreachable at start
UNREACHABLE = (OSError, aiohttp.ClientError, asyncio.TimeoutError, discord.HTTPException)  # down, not refusing us


async def _log_in_later(bot, token: str, announce) -> None:
    """Log in once Discord answers, then stay connected (discord.py reconnects from there)."""
    while True:
        await asyncio.sleep(RETRY_S)
        try:
            await bot.login(token)
        except discord.LoginFailure:
            log.error("Discord refused DISCORD_TOKEN; copy the bot token again from the Developer Portal. The bot "
                      "stays off until `serve` restarts.")
            return
        except UNREACHABLE as error:
            log.warning("Discord is still unreachable (%s); trying again in %.0f s", type(error).__name__, RETRY_S)
            continue
        announce(f"dreamloom serve: Discord bot logged in as {bot.user} (application {bot.application_id})")
        await bot.connect(reconnect=True)
        return


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
        runner = asyncio.create_task(bot.connect(reconnect=True))
        announce(f"dreamloom serve: Discord bot logged in as {bot.user} (application {bot.application_id})")
    except discord.LoginFailure:
        await bot.close()
        raise ConfigError("Discord refused DISCORD_TOKEN; copy the bot token again from the Developer Portal.") from None
    except UNREACHABLE as error:
        # Discord down or unreachable: the gallery and the worker run on; the bot keeps trying.
        announce(f"dreamloom serve: Discord is unreachable ({type(error).__name__}); the bot tries again every "
                 f"{RETRY_S:.0f} s, and the gallery and the queue run meanwhile")
        runner = asyncio.create_task(_log_in_later(bot, settings.discord_token, announce))

    async def stop() -> None:
        await bot.close()
        runner.cancel()
        try:
            await runner
        except (asyncio.CancelledError, Exception):
            pass

    stop.bot = bot  # tests and benchmarks reach the running client through the handle
    return stop
