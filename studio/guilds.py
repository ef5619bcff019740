"""Per-server (guild) settings that admins change from Discord: banned words, NSFW policy, limits, starboard."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update

from dreamloom.errors import InvalidRequest, NotAllowed
from storage.database import Database, uninterrupted
from storage.models import Guild, Image

NSFW_POLICIES = ("age-restricted", "never")
MAX_BANNED_WORDS = 200


@dataclass(frozen=True)
class GuildSettings:
    """What an admin of one server decides; stored as JSON in `guilds.settings`."""

    banned_words: tuple[str, ...] = ()
    nsfw: str = "age-restricted"  # NSFW-tagged models only in age-restricted channels, or never
    max_queued_per_user: int | None = None  # None: the service's setting
    daily_quota: int | None = None
    gallery_channel_id: str | None = None  # the starboard: images reaching the threshold are reposted here
    vote_threshold: int = 5
    public_gallery: bool = False  # whether this server's images appear in the public web gallery

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuildSettings:
        """Read stored settings, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "banned_words" in values:
            values["banned_words"] = tuple(values["banned_words"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON for the database."""
        data = dataclasses.asdict(self)
        data["banned_words"] = list(self.banned_words)
        return data

    def changed(self, **changes: Any) -> GuildSettings:
        """A checked copy with `changes` applied; bad values raise `InvalidRequest` naming the setting."""
        if "nsfw" in changes and changes["nsfw"] not in NSFW_POLICIES:
            raise InvalidRequest(f"nsfw must be one of {', '.join(NSFW_POLICIES)}.")
        for name in ("max_queued_per_user", "daily_quota"):
            if changes.get(name) is not None and not 1 <= int(changes[name]) <= 10_000:
                raise InvalidRequest(f"{name} must be from 1 to 10000 (or unset).")
        if "vote_threshold" in changes and not 1 <= int(changes["vote_threshold"]) <= 1000:
            raise InvalidRequest("vote_threshold must be from 1 to 1000.")
        if "banned_words" in changes:
            words = tuple(dict.fromkeys(w.strip().lower() for w in changes["banned_words"] if w.strip()))
            if len(words) > MAX_BANNED_WORDS or any(len(w) > 100 for w in words):
                raise InvalidRequest(f"At most {MAX_BANNED_WORDS} banned words of up to 100 characters each.")
            changes["banned_words"] = words
        return dataclasses.replace(self, **changes)

    def check_model(self, name: str, tags: tuple[str, ...], age_restricted_channel: bool | None) -> None:
        """Refuse a model tagged `nsfw` where the server's policy does not allow it."""
        if "nsfw" in tags and (self.nsfw == "never" or not age_restricted_channel):
            where = "on this server" if self.nsfw == "never" else "outside age-restricted channels"
            raise NotAllowed(f"The model {name} is tagged NSFW and is not available {where}.")

    def check_prompt(self, text: str) -> None:
        """Refuse a prompt that contains a banned word (whole words, any case), naming the word."""
        lowered = text.lower()
        for word in self.banned_words:
            if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", lowered):
                raise NotAllowed(f"The word \u201c{word}\u201d is not allowed on this server; remove it and try again.")


class Guilds:
    """Servers' settings (what their admins change from Discord) and their starboards, over the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @uninterrupted
    async def settings(self, guild_id: str) -> GuildSettings:
        """A server's settings (defaults when it never changed any)."""
        async with self.db.session() as session:
            guild = await session.get(Guild, guild_id)
            return GuildSettings.from_dict(guild.settings if guild else {})

    @uninterrupted
    async def update(self, guild_id: str, name: str = "", **changes: Any) -> GuildSettings:
        """Change some of a server's settings (checked); returns all of them."""
        async with self.db.session() as session:
            guild = await session.get(Guild, guild_id)
            if guild is None:
                guild = Guild(id=guild_id, name=name[:200], settings={})
                session.add(guild)
            updated = GuildSettings.from_dict(guild.settings).changed(**changes)
            guild.settings = {**guild.settings, **updated.to_dict()}
            return updated

    @uninterrupted
    async def claim_starboard(self, image_id: int, guild_id: str) -> GuildSettings | None:
        """Whether an image just reached its server's 👍 threshold and should be reposted (once, ever).

        Returns the server's settings when this caller must post it, then `starboard_posted` records the message.
        """
        rules = await self.settings(guild_id)
        if not rules.gallery_channel_id:
            return None
        async with self.db.session() as session:
            claimed = await session.execute(update(Image).where(
                Image.id == image_id, Image.starboard_message_id.is_(None), Image.up_votes >= rules.vote_threshold,
            ).values(starboard_message_id="pending"))
            return rules if claimed.rowcount == 1 else None

    @uninterrupted
    async def starboard_posted(self, image_id: int, message_id: str | None) -> None:
        """Record the repost (or, with None after a failed post, allow a later vote to try again)."""
        async with self.db.session() as session:
            await session.execute(update(Image).where(Image.id == image_id).values(starboard_message_id=message_id))
