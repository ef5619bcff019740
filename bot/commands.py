"""Slash commands: typed options, parsed here, checked again by the studio, answered by `bot.render`."""
from __future__ import annotations

from typing import Literal

import discord
from discord import app_commands

from bot import render
from bot.buttons import cancel_view
from bot.render import user_key
from dreamloom.errors import InvalidImage, NotFound

Period = Literal["day", "week", "all", "new"]


class AdminCommands(app_commands.Group):
    """Server settings; hidden from members without Manage Server, and checked on every use."""

    def __init__(self, bot) -> None:
        super().__init__(name="admin", description="Dreamloom settings for this server",
                         default_permissions=discord.Permissions(manage_guild=True), guild_only=True)
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        # default_permissions only hides the commands; a member could still call them, so check for real.
        if interaction.guild is None:
            raise app_commands.NoPrivateMessage()
        if not interaction.permissions.manage_guild:
            raise app_commands.MissingPermissions(["manage_guild"])
        return True

    async def _update(self, interaction: discord.Interaction, **changes) -> None:
        rules = await self.bot.studio.guilds.update(str(interaction.guild_id), interaction.guild.name, **changes)
        shown = ", ".join(f"{key}: {value if value not in (None, ()) else 'unset'}" for key, value in rules.to_dict().items())
        await interaction.response.send_message(render.clip(f"Saved. {shown}"), ephemeral=True)

    @app_commands.command(name="reload", description="Read models.toml again")
    async def reload_registry(self, interaction: discord.Interaction) -> None:
        self.bot.studio.reload_registry()
        catalog = self.bot.studio.catalog()
        await interaction.response.send_message(
            f"Registry reloaded: {len(catalog['models'])} model(s), {len(catalog['loras'])} LoRA(s).", ephemeral=True)

    @app_commands.command(name="ban", description="Stop a member from generating and voting (their images leave the gallery)")
    @app_commands.describe(purge_votes="Also remove every vote they cast (the counts are recomputed)")
    async def ban(self, interaction: discord.Interaction, member: discord.User, purge_votes: bool = False) -> None:
        removed = await self.bot.studio.set_banned(user_key(member), True, purge_votes=purge_votes)
        votes = f" {removed} vote(s) removed." if purge_votes else ""
        await interaction.response.send_message(f"{member.mention} is banned from generating and voting.{votes}",
                                                ephemeral=True)

    @app_commands.command(name="unban", description="Let a banned member generate again")
    async def unban(self, interaction: discord.Interaction, member: discord.User) -> None:
        await self.bot.studio.set_banned(user_key(member), False)
        await interaction.response.send_message(f"{member.mention} may generate again.", ephemeral=True)

    @app_commands.command(name="banned-words", description="Words refused in prompts (comma-separated; empty clears)")
    async def banned_words(self, interaction: discord.Interaction, words: app_commands.Range[str, 0, 4000] = "") -> None:
        await self._update(interaction, banned_words=[w for w in words.split(",")])

    @app_commands.command(name="nsfw", description="Where models tagged nsfw may run")
    async def nsfw_policy(self, interaction: discord.Interaction, policy: Literal["age-restricted", "never"]) -> None:
        await self._update(interaction, nsfw=policy)

    @app_commands.command(name="limits", description="Jobs a member may queue at once, and per day (0: the default)")
    async def limits(self, interaction: discord.Interaction, queued: app_commands.Range[int, 0, 10000],
                     daily: app_commands.Range[int, 0, 10000] = 0) -> None:
        await self._update(interaction, max_queued_per_user=queued or None, daily_quota=daily or None)

    @app_commands.command(name="learn", description="Learn the next house style of a model from this community's votes")
    @app_commands.describe(model="The base model (default: the default model)", objective="kto: 👍 and 👎 per image; dpo: 👍 against 👎 of the same prompt; sft: 👍 only",
                           steps="Training steps (default 400; more: a stronger style, longer)")
    async def learn(self, interaction: discord.Interaction, model: app_commands.Range[str, 1, 200] | None = None,
                    objective: Literal["kto", "dpo", "sft"] = "kto", steps: app_commands.Range[int, 10, 5000] | None = None) -> None:
        guild = str(interaction.guild_id) if interaction.guild_id else None
        await self.bot.start_job(interaction, lambda: self.bot.studio.submit_learn(
            user_key(interaction.user), model, objective=objective, steps=steps, guild_id=guild,
            channel_id=str(interaction.channel_id)))

    @app_commands.command(name="compare", description="An X/Y comparison grid: one prompt, the same seed in every cell")
    @app_commands.describe(prompt="The base prompt (its --seed, else 1, is every cell's)",
                           x="An axis: model=A,B | seed=1,2 | cfg=3,7 | steps=10,20 | sampler=euler,dpmpp_2m | "
                             "lora:NAME=0,0.5,1 | prompt=one|two | alpha=0,0.5,1",
                           y="A second axis (rows)", merge_with="For an alpha axis: the model merged with the prompt's")
    async def compare(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 1500],
                      x: app_commands.Range[str, 3, 400], y: app_commands.Range[str, 3, 400] | None = None,
                      merge_with: app_commands.Range[str, 1, 200] | None = None) -> None:
        age_restricted = self.bot.age_restricted(interaction.channel)
        await self.bot.start_job(interaction, lambda: self.bot.studio.submit_compare(
            user_key(interaction.user), prompt, x, y, merge_with=merge_with, guild_id=str(interaction.guild_id),
            channel_id=str(interaction.channel_id), age_restricted_channel=age_restricted))

    @app_commands.command(name="status", description="The live workers, what they hold and run, and the queue")
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(render.status(await self.bot.studio.status()), ephemeral=True)

    @app_commands.command(name="styles", description="Learned house styles: list, activate (roll back) or retire")
    async def styles(self, interaction: discord.Interaction, activate: app_commands.Range[str, 1, 160] | None = None,
                     retire: app_commands.Range[str, 1, 160] | None = None) -> None:
        for status, name in (("active", activate), ("retired", retire)):
            if name:
                await self.bot.studio.set_style_status(name, status)
        views = [v for v in await self.bot.studio.styles() if v.kind == "house"]
        await interaction.response.send_message(
            render.clip("\n".join(render.style_line(v) for v in views) or "No house style learned yet: /admin learn."),
            ephemeral=True)

    @app_commands.command(name="routing", description="What routing learned on this server from members' own choices: "
                                                      "list, forget one, or clear")
    @app_commands.describe(forget="The number (#) of an example to forget",
                           clear="Forget every example of this server (of `target` only, when given)",
                           target="Only the examples of this model or LoRA")
    async def routing(self, interaction: discord.Interaction, forget: app_commands.Range[int, 1, 2**62] | None = None,
                      clear: bool = False, target: app_commands.Range[str, 1, 200] | None = None) -> None:
        studio, guild = self.bot.studio, str(interaction.guild_id)
        lines = []
        if forget is not None or clear:
            removed = await studio.forget_route_examples(ids=[forget] if forget is not None else None, guild_id=guild,
                                                         target=target)
            lines.append(f"Forgot {removed} example(s).")
        examples = await studio.route_examples(guild, target)
        lines += [render.route_example_line(example) for example in examples[:15]]
        if len(examples) > 15:
            lines.append(f"... and {len(examples) - 15} more (`dreamloom route-examples --guild {guild}` lists them all).")
        if not examples:
            lines.append("No learned routing examples on this server yet: a prompt becomes one when its member chose the "
                         "model or LoRA themselves and another member up-voted the result.")
        await interaction.response.send_message(render.clip("\n".join(lines)), ephemeral=True)

    @app_commands.command(name="gallery", description="The starboard: where images reaching the vote threshold go")
    async def gallery_channel(self, interaction: discord.Interaction, channel: discord.TextChannel | None = None,
                      threshold: app_commands.Range[int, 1, 1000] | None = None, public: bool | None = None) -> None:
        changes = {}
        if channel is not None:
            changes["gallery_channel_id"] = str(channel.id)
        if threshold is not None:
            changes["vote_threshold"] = threshold
        if public is not None:
            changes["public_gallery"] = public
        await self._update(interaction, **changes)


def register_commands(bot) -> None:
    """Add every slash command to `bot.tree`."""
    tree = bot.tree
    studio = bot.studio

    async def model_names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = [m["name"] for m in studio.catalog()["models"]]
        return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]

    async def lora_names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = [m["name"] for m in studio.catalog()["loras"] if "learned" not in m["tags"]]
        return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]

    @tree.command(name="imagine", description="Create images from a prompt")
    @app_commands.describe(prompt="What to see, with --parameters (see /help)", image="An image prompt (PNG, JPEG, WebP, GIF or BMP)",
                           model="A model (overrides the automatic choice)", lora="A LoRA, as name or name:weight")
    @app_commands.autocomplete(model=model_names, lora=lora_names)
    async def imagine(interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 1500],
                      image: discord.Attachment | None = None, model: app_commands.Range[str, 1, 200] | None = None,
                      lora: app_commands.Range[str, 1, 200] | None = None) -> None:
        text = prompt
        if model:
            text += f" --model {model}"
        if lora:
            text += f" --lora {lora}"
        # Bad input is answered at once and privately, before anything is deferred or downloaded.
        studio.check_prompt(text)
        if image is not None:
            if image.size > 20 * 2**20:
                raise InvalidImage(f"{image.filename} is {image.size / 2**20:.1f} MB; image prompts may be at most 20 MB.")
            if image.content_type and not image.content_type.startswith("image/"):
                raise InvalidImage(f"{image.filename} is not an image ({image.content_type}); attach a PNG, JPEG, WebP, GIF or BMP.")

        async def submit():
            data = await image.read() if image is not None else None
            return await studio.submit_imagine(
                user_key(interaction.user), text, guild_id=str(interaction.guild_id) if interaction.guild_id else None,
                channel_id=str(interaction.channel_id), image_prompt=data,
                age_restricted_channel=bot.age_restricted(interaction.channel))

        await bot.start_job(interaction, submit)

    @tree.command(name="settings", description="Your default parameters (used where a prompt does not say)")
    async def settings(interaction: discord.Interaction, ar: app_commands.Range[str, 3, 11] | None = None,
                       stylize: app_commands.Range[int, 0, 1000] | None = None,
                       chaos: app_commands.Range[int, 0, 100] | None = None,
                       model: app_commands.Range[str, 1, 200] | None = None,
                       n: app_commands.Range[int, 1, 4] | None = None, reset: bool = False) -> None:
        defaults = {} if reset else await studio.community.user_defaults(user_key(interaction.user))
        given = {"ar": ar, "stylize": stylize, "chaos": chaos, "model": model, "n": n}
        defaults.update({k: v for k, v in given.items() if v is not None})
        if reset or any(v is not None for v in given.values()):
            defaults = await studio.community.set_user_defaults(user_key(interaction.user), defaults)
        shown = " ".join(f"--{k} {v}" for k, v in defaults.items()) or "none (each prompt says what it wants)"
        await interaction.response.send_message(f"Your defaults: {shown}", ephemeral=True)

    settings.autocomplete("model")(model_names)

    @tree.command(name="models", description="The installed models")
    async def models(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(render.catalog_lines(studio.catalog()["models"], "models"), ephemeral=True)

    @tree.command(name="loras", description="The installed LoRAs and their trigger words")
    async def loras(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(render.catalog_lines(studio.catalog()["loras"], "LoRAs"), ephemeral=True)

    @tree.command(name="queue", description="Your queued and running jobs (with cancel buttons)")
    async def queue(interaction: discord.Interaction) -> None:
        jobs = [job for status in ("running", "queued") for job in await studio.jobs(user_key(interaction.user), status, 25)]
        if not jobs:
            await interaction.response.send_message("You have no queued or running jobs.", ephemeral=True)
            return
        lines = [f"Job {job.id} ({job.status}): {job.prompt[:80]}" for job in jobs]
        view = cancel_view([job.id for job in jobs])
        await interaction.response.send_message(render.clip("\n".join(lines)), view=view, ephemeral=True)

    @tree.command(name="info", description="A job's parameters, seed, model, LoRAs and lineage")
    async def info(interaction: discord.Interaction, job: app_commands.Range[int, 1, 2**53]) -> None:
        view = await studio.job(job)
        if view.guild_id and view.guild_id != str(interaction.guild_id):
            raise NotFound(f"There is no job {job} on this server.")
        lineage = await studio.showcase.lineage(view.images[0].id) if view.images else None
        await interaction.response.send_message(render.job_info(view, lineage), ephemeral=True)

    @tree.command(name="personalize", description="Your personal style (--p): what it needs, its status, or train it")
    @app_commands.describe(model="The base model (default: the default model)", start="Train your style now")
    @app_commands.autocomplete(model=model_names)
    async def personalize(interaction: discord.Interaction, model: app_commands.Range[str, 1, 200] | None = None,
                          start: bool = False) -> None:
        member = user_key(interaction.user)
        name = studio.registry.get(model).name if model else studio.registry.default
        if not start:
            mine = [v for v in await studio.styles(name, owner=member) if v.kind == "personal"]
            needs = await studio.personal_needs(member, name)
            lines = [render.style_line(v) for v in mine] or [f"No personal style for {name} yet."]
            await interaction.response.send_message(render.clip("\n".join([*lines, f"For a new one: {needs}"])),
                                                    ephemeral=True)
            return
        guild = str(interaction.guild_id) if interaction.guild_id else None
        await bot.start_job(interaction, lambda: studio.submit_learn(member, name, voter=member, guild_id=guild,
                                                                     channel_id=str(interaction.channel_id)))

    @tree.command(name="help", description="Prompt syntax, buttons and reactions")
    async def help_command(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(render.HELP_TEXT, ephemeral=True)

    @tree.command(name="gallery", description="This server's best images")
    @app_commands.autocomplete(model=model_names)
    async def gallery(interaction: discord.Interaction, period: Period = "week",
                      model: app_commands.Range[str, 1, 60] | None = None) -> None:
        await bot.show_gallery(interaction, period, 1, model)

    tree.add_command(AdminCommands(bot))
