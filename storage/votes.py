"""Community votes and favourites: one vote per user and image, removable."""
from __future__ import annotations

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from datetime import timedelta

from dreamloom.errors import InvalidRequest, LimitReached, NotFound
from storage.database import dialect_insert
from storage.models import Favourite, Image, Vote, utcnow
from storage.queue import ensure_user
from storage.ranking import wilson_lower_bound

VOTE_SOURCES = ("reaction", "button", "web", "cli")


async def _require_image(session: AsyncSession, image_id: int) -> None:
    if not isinstance(image_id, int) or await session.get(Image, image_id) is None:
        raise NotFound(f"There is no image {image_id}.")


async def set_vote(session: AsyncSession, user_id: str, image_id: int, value: int, source: str, *,
                   verified: bool = True, max_per_minute: int | None = None) -> None:
    """Record `user_id`'s vote on an image, replacing an earlier one.

    `verified`: the voter is a Discord member or the owner (only verified votes are counted). `max_per_minute`
    caps how fast one member votes (a script on a real account), counted in the database so it holds across
    processes.
    """
    if value not in (1, -1):
        raise InvalidRequest(f"A vote is +1 or -1; got {value}.")
    if source not in VOTE_SOURCES:
        raise InvalidRequest(f"Vote source must be one of {', '.join(VOTE_SOURCES)}.")
    await _require_image(session, image_id)
    await ensure_user(session, user_id)
    now = utcnow()
    if max_per_minute is not None:
        recent = await session.scalar(select(func.count()).where(Vote.user_id == user_id,
                                                                 Vote.created_at > now - timedelta(minutes=1)))
        if recent >= max_per_minute:
            raise LimitReached(f"You have voted {recent} times in the last minute, the most allowed; "
                               "try again in a minute.", retry_after=60)
    statement = dialect_insert(session, Vote).values(user_id=user_id, image_id=image_id, value=value, source=source,
                                                verified=verified, created_at=now)
    await session.execute(statement.on_conflict_do_update(
        index_elements=[Vote.user_id, Vote.image_id],
        set_={"value": statement.excluded.value, "source": statement.excluded.source,
              "verified": statement.excluded.verified, "created_at": statement.excluded.created_at}))
    await _refresh_counts(session, image_id)


async def remove_vote(session: AsyncSession, user_id: str, image_id: int) -> bool:
    """Remove a vote; False when there was none."""
    result = await session.execute(delete(Vote).where(Vote.user_id == user_id, Vote.image_id == image_id))
    if result.rowcount == 1:
        await _refresh_counts(session, image_id)
    return result.rowcount == 1


async def purge_votes(session: AsyncSession, user_id: str) -> int:
    """Remove every vote of one member (an admin's ban) and recount the images they voted on; returns how many."""
    image_ids = list((await session.scalars(select(Vote.image_id).where(Vote.user_id == user_id))).all())
    await session.execute(delete(Vote).where(Vote.user_id == user_id))
    for image_id in image_ids:
        await _refresh_counts(session, image_id)
    return len(image_ids)


async def _refresh_counts(session: AsyncSession, image_id: int) -> None:
    # Recounted (not incremented) in the vote's own transaction: always equal to the votes table.
    up, down = await tally(session, image_id)
    await session.execute(update(Image).where(Image.id == image_id)
                          .values(up_votes=up, down_votes=down, score=wilson_lower_bound(up, down)))


async def tallies(session: AsyncSession, image_ids: list[int]) -> dict[int, tuple[int, int]]:
    """Verified (up votes, down votes) of each image, in one query; images without votes get (0, 0)."""
    counts = {image_id: (0, 0) for image_id in image_ids}
    if not image_ids:
        return counts
    rows = await session.execute(select(
        Vote.image_id, func.sum(case((Vote.value > 0, 1), else_=0)), func.sum(case((Vote.value < 0, 1), else_=0)))
        .where(Vote.image_id.in_(image_ids), Vote.verified.is_(True)).group_by(Vote.image_id))
    for image_id, up, down in rows:
        counts[image_id] = (int(up), int(down))
    return counts


async def tally(session: AsyncSession, image_id: int) -> tuple[int, int]:
    """Verified (up votes, down votes) of an image: what ranking, the starboard and the export count."""
    return (await tallies(session, [image_id]))[image_id]


async def set_favourite(session: AsyncSession, user_id: str, image_id: int, favourite: bool = True) -> None:
    """Add an image to (or remove it from) a user's private collection."""
    await _require_image(session, image_id)
    await ensure_user(session, user_id)
    if favourite:
        await session.execute(dialect_insert(session, Favourite).values(user_id=user_id, image_id=image_id, created_at=utcnow())
                              .on_conflict_do_nothing(index_elements=[Favourite.user_id, Favourite.image_id]))
    else:
        await session.execute(delete(Favourite).where(Favourite.user_id == user_id, Favourite.image_id == image_id))


async def favourites(session: AsyncSession, user_id: str) -> list[int]:
    """Image ids in a user's collection, newest first."""
    return list((await session.scalars(select(Favourite.image_id).where(Favourite.user_id == user_id)
                                       .order_by(Favourite.created_at.desc()))).all())


async def vote_of(session: AsyncSession, user_id: str, image_id: int) -> int:
    """A user's vote on an image: 1, -1, or 0 when they have not voted."""
    value = await session.scalar(select(Vote.value).where(Vote.user_id == user_id, Vote.image_id == image_id))
    return int(value or 0)
