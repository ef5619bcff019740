"""Per-server (guild) settings that admins change from Discord: banned words, NSFW policy, limits, starboard."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from dreamloom.errors import InvalidRequest, NotAllowed

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
