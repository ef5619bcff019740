"""The Discord client: slash commands, persistent buttons, reactions, and one error handler."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from pathlib import Path

import discord
from discord import app_commands

from bot import render
from bot.render import user_key
from bot.buttons import IMAGE_ACTIONS, CancelButton, GalleryPageButton, JobActionButton, gallery_view
from bot.commands import register_commands
from bot.delivery import InteractionPost, MessagePost, TokenExpired, follow_job
from dreamloom.errors import DreamloomError, public_message

log = logging.getLogger(__name__)

NUMBER_EMOJI = {"1\ufe0f\u20e3": 1, "2\ufe0f\u20e3": 2, "3\ufe0f\u20e3": 3, "4\ufe0f\u20e3": 4}
REROLL, VARY_SUBTLE, VARY_STRONG, UPSCALE_CREATIVE = "\U0001f504", "\U0001f3a8", "\U0001f300", "\U0001f50d"
UP, DOWN, STAR = "\U0001f44d", "\U0001f44e", "\u2b50"
INTERACTION_LIFETIME_S = 14 * 60  # Discord's interaction tokens last 15 minutes; keep a margin


class DreamloomBot(discord.AutoShardedClient):
    """A thin adapter: parse what Discord sends, call the studio, render the answer.

    Sharded automatically: with no `discord_shards` setting it runs as many gateway shards as Discord recommends
    (GET /gateway/bot: one below 2 500 servers, more past that, where Discord requires them), all in this process.
    """

    def __init__(self, studio, settings, *, interaction_lifetime_s: float = INTERACTION_LIFETIME_S,
                 poll_interval_s: float = 10.0) -> None:
        # No privileged intents: slash commands and raw reaction events need none of them.
        # Nothing the bot posts pings anyone: prompts are echoed into messages, and `/imagine @everyone ...` must not
        # reach the whole server (mentions still render as names).
        super().__init__(intents=discord.Intents(guilds=True, guild_reactions=True),
                         allowed_mentions=discord.AllowedMentions.none(), shard_count=settings.discord_shards)
        self.studio = studio
        self.settings = settings
        self.interaction_lifetime_s = interaction_lifetime_s
        self.poll_interval_s = poll_interval_s
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self.on_app_command_error
        self._followers: dict[int, asyncio.Task] = {}
        self._resumed = False
        register_commands(self)

    # -- lifecycle ------------------------------------------------------------------------------------

    async def setup_hook(self) -> None:
        self.add_dynamic_items(JobActionButton, CancelButton, GalleryPageButton)
        await self._sync_commands()

    async def _sync_commands(self) -> None:
        """Register the slash commands with Discord when they changed (syncing is itself rate limited)."""
        payload = [command.to_dict(self.tree) for command in self.tree.get_commands()]
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=_stable).encode()).hexdigest()
        marker = Path(self.settings.data_dir) / f"discord-commands-{self.application_id}.sha256"
        if marker.is_file() and marker.read_text() == digest:
            return
        await self.tree.sync()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(digest)

    async def on_ready(self) -> None:
        log.info("Discord: connected as %s to %d server(s)", self.user, len(self.guilds))
        if not self._resumed:
            self._resumed = True
            await self._follow_unfinished_jobs()

    async def _follow_unfinished_jobs(self) -> None:
        """After a restart, keep updating the messages of jobs that were still queued or running."""
        for status in ("queued", "running"):
            for job in await self.studio.jobs(status=status, limit=500):
                if job.channel_id and job.message_id and job.user_id.startswith("discord:"):
                    channel = self.get_partial_messageable(int(job.channel_id))
                    self.follow(MessagePost(channel, int(job.message_id)), job.id)

    def follow(self, post, job_id: int) -> None:
        """Follow a job in the background until its result is delivered."""
        task = asyncio.create_task(follow_job(self, post, job_id))
        self._followers[job_id] = task
        task.add_done_callback(lambda done: self._followed(job_id, done))

    def _followed(self, job_id: int, task: asyncio.Task) -> None:
        if self._followers.get(job_id) is task:
            del self._followers[job_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("delivering job %s failed", job_id, exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._followers.values()):
            task.cancel()
        await super().close()

    # -- jobs from commands, buttons and reactions ------------------------------------------------------

    @staticmethod
    def age_restricted(channel) -> bool:
        """Whether NSFW-tagged models may run here."""
        is_nsfw = getattr(channel, "is_nsfw", None)
        return bool(is_nsfw()) if callable(is_nsfw) else False

    async def start_job(self, interaction: discord.Interaction, submit) -> None:
        """Defer (inside Discord's 3 seconds), queue the job, acknowledge with its place, then follow it."""
        callback = await interaction.response.defer(thinking=True)
        job = await submit()
        post = InteractionPost(interaction, self.interaction_lifetime_s)
        if callback is not None and callback.message_id:
            post.message_id = callback.message_id
            await self.studio.attach_message(job.id, str(interaction.channel_id), str(callback.message_id))
        try:
            # Best effort: under a rate-limit storm the job must still be followed and delivered.
            message_id = await post.edit(content=render.queued(job))
            await self.studio.attach_message(job.id, str(interaction.channel_id), str(message_id))
        except (discord.HTTPException, TokenExpired) as error:
            log.info("acknowledgement of job %s not shown: %s", job.id, error)
        self.follow(post, job.id)

    async def submit_action(self, user_id: str, action: str, target: int, channel):
        """Queue an upscale, variation or reroll."""
        restricted = self.age_restricted(channel)
        if action == "r":
            return await self.studio.submit_reroll(user_id, target, age_restricted_channel=restricted)
        kind, mode = IMAGE_ACTIONS[action]
        return await self.studio.submit_from_image(user_id, target, kind, mode, age_restricted_channel=restricted)

    async def guarded(self, interaction: discord.Interaction, work) -> None:
        """Run a button's work; our errors become ephemeral replies (buttons bypass the command tree's handler)."""
        try:
            await work
        except DreamloomError as error:
            await self.reply_error(interaction, public_message(error))
        except Exception:
            log.exception("button failed")
            await self.reply_error(interaction, "Something went wrong on our side; it has been logged.")

    async def run_button_action(self, interaction: discord.Interaction, action: str, target: int) -> None:
        """A button under a result was pressed."""
        await self.guarded(interaction, self.start_job(
            interaction, lambda: self.submit_action(user_key(interaction.user), action, target, interaction.channel)))

    async def cancel_job(self, interaction: discord.Interaction, job_id: int) -> None:
        """The Cancel button of /queue (owners only)."""
        async def work():
            job = await self.studio.cancel(job_id, user_key(interaction.user))
            state = "stopping at its next step" if job.status == "running" else job.status
            await interaction.response.send_message(f"Job {job.id}: {state}.", ephemeral=True)
        await self.guarded(interaction, work())

    async def show_gallery(self, interaction: discord.Interaction, period: str, page: int, model: str | None,
                           *, edit: bool = False) -> None:
        """One image per page of the server's gallery, with previous / next buttons."""
        await self.guarded(interaction, self._show_gallery(interaction, period, page, model, edit))

    async def _show_gallery(self, interaction: discord.Interaction, period: str, page: int, model: str | None,
                            edit: bool) -> None:
        items, has_more = await self.studio.showcase.discord_gallery(str(interaction.guild_id) if interaction.guild_id else None,
                                                            period, page, model)
        if not items:
            text = f"No images for {period}" + (f" on {model}" if model else "") + " yet."
            if edit:
                await interaction.response.edit_message(content=text, attachments=[], view=None)
            else:
                await interaction.response.send_message(text, ephemeral=True)
            return
        item = items[0]
        name, data = await self.studio.showcase.gallery_file(item.image_id, int(self.settings.discord_upload_limit_mb * 2**20))
        content = render.clip(
            f"**Gallery: {period}**{' · ' + model if model else ''} · #{page}\n**{item.prompt}** - "
            f"{render.mention(item.user_id)} · \u25b2{item.up} \u25bc{item.down} · "
            f"{self.settings.gallery_url}/image/{item.image_id}")
        fields = dict(content=content, attachments=[discord.File(io.BytesIO(data), filename=name)],
                      view=gallery_view(period, page, model, has_more))
        if edit:
            await interaction.response.edit_message(**fields)
        else:
            fields["files"] = fields.pop("attachments")
            await interaction.response.send_message(**fields)

    # -- reactions ------------------------------------------------------------------------------------------

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self._on_reaction(payload, added=True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self._on_reaction(payload, added=False)

    async def _on_reaction(self, payload: discord.RawReactionActionEvent, added: bool) -> None:
        if self.user is None or payload.user_id == self.user.id:
            return
        emoji = str(payload.emoji)
        if emoji not in NUMBER_EMOJI and emoji not in (REROLL, VARY_SUBTLE, VARY_STRONG, UPSCALE_CREATIVE, UP, DOWN, STAR):
            return
        job = await self.studio.job_for_message(str(payload.message_id))
        if job is None or job.status != "done" or not job.images:
            return
        user_id = user_key(payload.user_id)
        channel = self.get_channel(payload.channel_id) or self.get_partial_messageable(payload.channel_id)
        try:
            await self._react(job, emoji, user_id, channel, added, payload.guild_id)
        except DreamloomError as error:
            await self._tell(channel, payload.user_id, public_message(error))

    async def _react(self, job, emoji: str, user_id: str, channel, added: bool, guild_id: int | None) -> None:
        grid = len(job.images) > 1
        if emoji in (UP, DOWN):
            for image in job.images:  # a vote on a grid counts for each of its images
                if added:
                    await self.studio.community.vote(image.id, user_id, 1 if emoji == UP else -1, source="reaction")
                    if emoji == UP and guild_id:
                        await self._maybe_starboard(image.id, str(guild_id))
                else:
                    await self.studio.community.unvote(image.id, user_id)
            return
        if emoji == STAR:
            for image in job.images:
                await self.studio.community.favourite(image.id, user_id, added)
            return
        if not added:
            return  # removing an action reaction does not undo the job
        if grid and emoji in NUMBER_EMOJI:
            index = NUMBER_EMOJI[emoji]
            images = [image for image in job.images if image.index == index]
            if not images:
                return
            action, target = "u", images[0].id
        elif grid and emoji == REROLL:
            action, target = "r", job.id
        elif not grid and emoji in (VARY_SUBTLE, VARY_STRONG, UPSCALE_CREATIVE):
            action = {VARY_SUBTLE: "vs", VARY_STRONG: "vx", UPSCALE_CREATIVE: "uc"}[emoji]
            target = job.images[0].id
        else:
            return
        new_job = await self.submit_action(user_id, action, target, channel)
        message = await channel.send(render.queued(new_job))
        await self.studio.attach_message(new_job.id, str(channel.id), str(message.id))
        self.follow(MessagePost(channel, message.id), new_job.id)

    async def _maybe_starboard(self, image_id: int, guild_id: str) -> None:
        """Repost an image to the server's gallery channel the first time it reaches the 👍 threshold."""
        rules = await self.studio.guilds.claim_starboard(image_id, guild_id)
        if rules is None:
            return
        try:
            detail = await self.studio.showcase.starboard_image(image_id)
            name, data = await self.studio.showcase.gallery_file(image_id, int(self.settings.discord_upload_limit_mb * 2**20))
            channel = self.get_partial_messageable(int(rules.gallery_channel_id))
            message = await channel.send(
                render.clip(f"\u2b50 **{detail['prompt']}** - {render.mention(detail['user_id'])} reached "
                            f"{detail['up']} \U0001f44d\n{self.settings.gallery_url}/image/{image_id}"),
                file=discord.File(io.BytesIO(data), filename=name))
        except Exception:
            await self.studio.guilds.starboard_posted(image_id, None)  # let a later vote try again
            raise
        await self.studio.guilds.starboard_posted(image_id, str(message.id))

    async def _tell(self, channel, user_id: int, text: str) -> None:
        """Reactions have no ephemeral replies: a short message that mentions the member and deletes itself."""
        try:
            await channel.send(render.clip(f"<@{user_id}> {text}"), delete_after=60)
        except discord.HTTPException:
            log.warning("could not tell %s: %s", user_id, text)

    # -- the one error handler ----------------------------------------------------------------------------

    async def on_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """Every command error becomes a short ephemeral reply; only our own bugs are logged."""
        original = getattr(error, "original", error)
        if isinstance(original, DreamloomError):
            text = public_message(original)
        elif isinstance(error, app_commands.MissingPermissions):
            text = "Admin commands need the Manage Server permission."
        elif isinstance(error, app_commands.NoPrivateMessage):
            text = "This command works only inside a server."
        elif isinstance(error, app_commands.TransformerError):
            text = f"{error.value!r} is not a valid value here."
        elif isinstance(error, app_commands.CheckFailure):
            text = "You are not allowed to use this command here."
        else:
            log.error("command failed", exc_info=original)
            text = "Something went wrong on our side; it has been logged. Try again in a moment."
        await self.reply_error(interaction, text)

    async def on_error(self, event_method: str, /, *args, **kwargs) -> None:
        log.exception("error in %s", event_method)

    @staticmethod
    async def reply_error(interaction: discord.Interaction, text: str) -> None:
        """An ephemeral error; if a public 'thinking' message was already shown, it is removed first."""
        text = render.clip(f"\u26a0\ufe0f {text}")
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(text, ephemeral=True)
                return
            if interaction.response.type in (discord.InteractionResponseType.deferred_channel_message,):
                try:
                    await interaction.delete_original_response()
                except discord.HTTPException:
                    pass
            await interaction.followup.send(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not send an error reply: %s", text)




def _stable(value) -> str:
    """JSON for the odd object inside a command's payload (its name), so the digest is the same on every start."""
    return getattr(value, "qualified_name", type(value).__name__)
