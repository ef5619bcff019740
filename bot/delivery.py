"""Following a job in Discord: acknowledgement, throttled progress edits with a preview, the final result."""
from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

import discord

from bot import render
from bot.buttons import grid_view, image_view

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")
FINAL_ATTEMPTS = 6


class TokenExpired(Exception):
    """The interaction's 15-minute token can no longer edit its message."""


class InteractionPost:
    """The message an interaction created (its original response), edited through the interaction's webhook."""

    def __init__(self, interaction: discord.Interaction, lifetime_s: float) -> None:
        self.interaction = interaction
        self.channel = interaction.channel
        self.expires_at = time.monotonic() + lifetime_s
        self.message_id: int | None = None

    async def edit(self, **fields: Any) -> int:
        """Edit the message; raises TokenExpired when the interaction token is (about to be) too old."""
        if time.monotonic() >= self.expires_at:
            raise TokenExpired()
        try:
            message = await self.interaction.edit_original_response(**fields)
        except (discord.NotFound, discord.Forbidden) as error:
            raise TokenExpired() from error
        except discord.HTTPException as error:
            if error.status == 401:  # "Invalid Webhook Token": older than 15 minutes
                raise TokenExpired() from error
            raise
        self.message_id = message.id
        return message.id


class MessagePost:
    """A message the bot sent in a channel, edited through the channel (works after restarts and token expiry)."""

    def __init__(self, channel: discord.abc.Messageable, message_id: int) -> None:
        self.channel = channel
        self.message_id = message_id

    async def edit(self, **fields: Any) -> int:
        """Edit the message in place."""
        await self.channel.get_partial_message(self.message_id).edit(**fields)
        return self.message_id


def _file(name: str, data: bytes) -> discord.File:
    return discord.File(io.BytesIO(data), filename=name)


async def follow_job(bot, post, job_id: int) -> None:
    """Show a job's progress on `post` until it ends, then deliver its result (the grid and its buttons).

    Progress edits are best effort and throttled; the final delivery retries, and falls back to a new channel
    message when the interaction token has expired.
    """
    studio = bot.studio
    events = studio.events.subscribe(job_id)
    try:
        job = await studio.job(job_id)
        last_edit = 0.0
        while job.status not in TERMINAL:
            try:
                event = await asyncio.wait_for(events.get(), timeout=bot.poll_interval_s)
            except TimeoutError:
                event = None
            if event is None or event.kind in TERMINAL:
                job = await studio.job(job_id)  # events are a fast path; the database is the truth
                continue
            if event.kind == "step" and time.monotonic() - last_edit >= bot.settings.discord_progress_interval_s:
                last_edit = time.monotonic()
                fields: dict[str, Any] = {"content": render.progress(job, event.step, event.total, event.message)}
                if event.preview_png:
                    fields["attachments"] = [_file("progress.png", event.preview_png)]
                await _best_effort(post, fields)
        await deliver_result(bot, post, job)
    finally:
        studio.events.unsubscribe(job_id, events)


async def _best_effort(post, fields: dict[str, Any]) -> None:
    try:
        await post.edit(**fields)
    except (discord.HTTPException, TokenExpired) as error:
        log.info("progress edit skipped: %s", error)


async def deliver_result(bot, post, job) -> None:
    """Put the final state of a job on its message (retrying), or on a new message if that is no longer possible."""
    fields: dict[str, Any] = {"content": render.finished(job), "attachments": []}
    if job.status == "done":
        name, data = await bot.studio.showcase.result_file(job.id, int(bot.settings.discord_upload_limit_mb * 2**20))
        fields["attachments"] = [_file(name, data)]
        if job.images and job.kind != "compare":  # a learning job's picture and a comparison grid have no buttons
            fields["view"] = grid_view(job) if len(job.images) > 1 else image_view(job.images[0].id)
    for attempt in range(FINAL_ATTEMPTS):
        try:
            _rewind(fields)
            message_id = await post.edit(**fields)
            break
        except TokenExpired:
            message_id = await _send_new(post.channel, fields)
            break
        except discord.HTTPException as error:
            if attempt == FINAL_ATTEMPTS - 1 or (error.status < 500 and error.status != 429):
                log.warning("could not edit the message of job %s (%s); sending a new one", job.id, error)
                message_id = await _send_new(post.channel, fields)
                break
            await asyncio.sleep(min(30, 2 ** attempt))
    await bot.studio.attach_message(job.id, str(post.channel.id), str(message_id))


def _rewind(fields: dict[str, Any]) -> None:
    # A failed upload consumed the files: every attempt sends them from the start.
    for file in fields["attachments"]:
        file.reset()


async def _send_new(channel, fields: dict[str, Any]) -> int:
    for attempt in range(FINAL_ATTEMPTS):
        _rewind(fields)
        try:
            message = await channel.send(content=fields["content"], files=fields["attachments"], view=fields.get("view"))
            return message.id
        except discord.HTTPException:
            if attempt == FINAL_ATTEMPTS - 1:
                raise
            await asyncio.sleep(min(30, 2 ** attempt))
    raise RuntimeError("unreachable")
