"""Persistent buttons: each `custom_id` carries its action and target, so a button works after any restart."""
from __future__ import annotations

import re

import discord

# action code -> (job kind, mode) for actions on an image; "r" (reroll) targets a job.
IMAGE_ACTIONS = {"u": ("upscale", "detail"), "v": ("vary", "subtle"), "vs": ("vary", "subtle"),
                 "vx": ("vary", "strong"), "uc": ("upscale", "creative")}
PERIODS = ("day", "week", "all", "new")


class JobActionButton(discord.ui.DynamicItem[discord.ui.Button], template=r"dl:(?P<action>u|v|r|vs|vx|uc):(?P<target>[0-9]{1,18})"):
    """U1-U4, V1-V4, reroll, and the buttons under an upscaled image."""

    def __init__(self, action: str, target: int, label: str | None = None, emoji: str | None = None,
                 style: discord.ButtonStyle = discord.ButtonStyle.secondary, row: int | None = None) -> None:
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style, row=row,
                                           custom_id=f"dl:{action}:{target}"))
        self.action = action
        self.target = target

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /):
        return cls(match["action"], int(match["target"]), item.label, item.emoji, item.style)

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.run_button_action(interaction, self.action, self.target)


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"dl:cancel:(?P<job>[0-9]{1,18})"):
    """Cancel one of your queued or running jobs (from /queue)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label=f"Cancel job {job_id}", style=discord.ButtonStyle.danger,
                                           custom_id=f"dl:cancel:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /):
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.cancel_job(interaction, self.job_id)


class GalleryPageButton(discord.ui.DynamicItem[discord.ui.Button],
                        template=r"dl:gal:(?P<period>day|week|all|new):(?P<page>[0-9]{1,4}):(?P<model>[A-Za-z0-9_.\-]{0,60})"):
    """Previous / next in a /gallery message."""

    def __init__(self, period: str, page: int, model: str, label: str, disabled: bool = False) -> None:
        super().__init__(discord.ui.Button(label=label, style=discord.ButtonStyle.secondary, disabled=disabled,
                                           custom_id=f"dl:gal:{period}:{page}:{model}"))
        self.period, self.page, self.model = period, page, model

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /):
        return cls(match["period"], int(match["page"]), match["model"], item.label or "")

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.show_gallery(interaction, self.period, self.page, self.model or None, edit=True)


def grid_view(job) -> discord.ui.View:
    """U1-U4, V1-V4 and reroll under a grid."""
    view = discord.ui.View(timeout=None)
    for image in job.images[:4]:
        view.add_item(JobActionButton("u", image.id, label=f"U{image.index}", row=0))
    view.add_item(JobActionButton("r", job.id, emoji="\U0001f504", row=0))
    for image in job.images[:4]:
        view.add_item(JobActionButton("v", image.id, label=f"V{image.index}", row=1))
    return view


def image_view(image_id: int) -> discord.ui.View:
    """The buttons under a single (upscaled) image."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobActionButton("vs", image_id, label="Vary (subtle)", emoji="\U0001f3a8"))
    view.add_item(JobActionButton("vx", image_id, label="Vary (strong)", emoji="\U0001f300"))
    view.add_item(JobActionButton("uc", image_id, label="Upscale (creative)", emoji="\U0001f50d"))
    return view


def cancel_view(job_ids: list[int]) -> discord.ui.View | None:
    """Cancel buttons for /queue (at most 25, Discord's limit)."""
    if not job_ids:
        return None
    view = discord.ui.View(timeout=None)
    for job_id in job_ids[:25]:
        view.add_item(CancelButton(job_id))
    return view


def gallery_view(period: str, page: int, model: str | None, has_more: bool) -> discord.ui.View:
    """Previous / next buttons of a /gallery message."""
    view = discord.ui.View(timeout=None)
    view.add_item(GalleryPageButton(period, max(1, page - 1), model or "", "\u25c0 Previous", disabled=page <= 1))
    view.add_item(GalleryPageButton(period, page + 1, model or "", "Next \u25b6", disabled=not has_more))
    return view
