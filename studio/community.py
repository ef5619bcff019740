"""Members and their taste: votes (verified or not), favourites and their default parameters (/settings)."""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from dreamloom.errors import DreamloomError, InvalidRequest, NotAllowed
from engine.params import apply_defaults, parse_prompt
from storage import queue, votes
from storage.database import Database, uninterrupted
from studio.settings import Settings

log = logging.getLogger(__name__)


class Community:
    """Votes, favourites and members' defaults over the database. `on_verified_up_vote(image_id)` runs after a
    verified up-vote (routing learns from it); its failure never undoes the vote."""

    def __init__(self, db: Database, settings: Settings,
                 on_verified_up_vote: Callable[[int], Awaitable[Any]] | None = None) -> None:
        self.db = db
        self.settings = settings
        self.on_verified_up_vote = on_verified_up_vote or _nothing

    @uninterrupted
    async def vote(self, image_id: int, user_id: str, value: int, source: str = "cli", *,
                   verified: bool = True) -> tuple[int, int]:
        """Record a vote (+1/-1) and return the image's verified (up, down).

        `verified` says the voter is a Discord member or the owner; an anonymous web visitor's vote is kept apart
        and not counted. Banned members cannot vote; one member votes at most `max_votes_per_minute` times a minute.
        """
        async with self.db.session() as session:
            user = await queue.ensure_user(session, user_id)
            if user.banned:
                raise NotAllowed("You are banned from this studio; ask a server admin.")
            await votes.set_vote(session, user_id, image_id, value, source, verified=verified,
                                 max_per_minute=None if source == "cli" else self.settings.max_votes_per_minute)
            tally = await votes.tally(session, image_id)
        if value == 1 and verified:
            try:
                await self.on_verified_up_vote(image_id)
            except DreamloomError as error:  # the vote stands even when routing cannot learn from it
                log.warning("routing did not learn from image %s: %s", image_id, error)
        return tally

    @uninterrupted
    async def vote_of(self, image_id: int, user_id: str) -> int:
        """A user's own vote on an image (1, -1, or 0), so a page can show it."""
        async with self.db.session() as session:
            return await votes.vote_of(session, user_id, image_id)

    @uninterrupted
    async def unvote(self, image_id: int, user_id: str) -> tuple[int, int]:
        """Remove a user's vote and return the image's (up, down)."""
        async with self.db.session() as session:
            await votes.remove_vote(session, user_id, image_id)
            return await votes.tally(session, image_id)

    @uninterrupted
    async def favourite(self, image_id: int, user_id: str, favourite: bool = True) -> list[int]:
        """Add or remove a favourite; returns the user's collection."""
        async with self.db.session() as session:
            await votes.set_favourite(session, user_id, image_id, favourite)
            return await votes.favourites(session, user_id)

    @uninterrupted
    async def favourites(self, user_id: str) -> list[int]:
        """A user's private collection (image ids)."""
        async with self.db.session() as session:
            return await votes.favourites(session, user_id)

    @uninterrupted
    async def user_defaults(self, user_id: str) -> dict[str, Any]:
        """A user's default parameters (/settings)."""
        async with self.db.session() as session:
            return dict((await queue.ensure_user(session, user_id)).defaults)

    @uninterrupted
    async def set_user_defaults(self, user_id: str, defaults: dict[str, Any]) -> dict[str, Any]:
        """Per-user default parameters (/settings), e.g. {"ar": "16:9", "stylize": 250}; checked like a prompt."""
        allowed = {"ar", "chaos", "stylize", "cfg", "steps", "q", "n", "sampler", "model", "niji", "tile", "no"}
        unknown = set(defaults) - allowed
        if unknown:
            raise InvalidRequest(f"Unknown default(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}.")
        parse_prompt(apply_defaults("x", defaults))
        async with self.db.session() as session:
            user = await queue.ensure_user(session, user_id)
            user.defaults = dict(defaults)
            return user.defaults


async def _nothing(image_id: int) -> None:
    return None
