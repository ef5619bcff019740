"""Learned routing examples: kept per server, bounded, removable (the engine weighs them by age)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.database import dialect_insert
from storage.models import RouteExampleRow, utcnow


async def record_example(session: AsyncSession, scope: str, text: str, target: str, embedding: bytes, *,
                         job_id: int | None, chosen_by: str, up_votes: int, max_per_scope: int,
                         now: datetime | None = None) -> None:
    """Keep (or refresh: learned again, full weight) an example; past `max_per_scope` the oldest go."""
    now = now or utcnow()
    statement = dialect_insert(session, RouteExampleRow).values(scope=scope, text=text[:300], target=target, embedding=embedding, job_id=job_id,
                                        chosen_by=chosen_by, up_votes=up_votes, learned_at=now)
    await session.execute(statement.on_conflict_do_update(
        index_elements=[RouteExampleRow.scope, RouteExampleRow.target, RouteExampleRow.text],
        set_={"learned_at": now, "up_votes": statement.excluded.up_votes, "job_id": statement.excluded.job_id,
              "chosen_by": statement.excluded.chosen_by}))
    count = await session.scalar(select(func.count()).where(RouteExampleRow.scope == scope))
    if count > max_per_scope:
        oldest = select(RouteExampleRow.id).where(RouteExampleRow.scope == scope).order_by(
            RouteExampleRow.learned_at, RouteExampleRow.id).limit(count - max_per_scope)
        await session.execute(delete(RouteExampleRow).where(RouteExampleRow.id.in_(oldest)))


async def examples(session: AsyncSession, scope: str | None = None, target: str | None = None) -> list[RouteExampleRow]:
    """The kept examples, newest first; one server's (`scope`) or all, one target's or all."""
    query = select(RouteExampleRow).order_by(RouteExampleRow.learned_at.desc(), RouteExampleRow.id.desc())
    if scope is not None:
        query = query.where(RouteExampleRow.scope == scope)
    if target is not None:
        query = query.where(RouteExampleRow.target == target)
    return list((await session.scalars(query)).all())


async def version(session: AsyncSession, scope: str) -> tuple[int, int, str]:
    """(count, largest id, latest learned time) of a server's examples: changes whenever one is added, refreshed away or removed."""
    row = (await session.execute(select(func.count(), func.max(RouteExampleRow.id), func.max(RouteExampleRow.learned_at))
                                 .where(RouteExampleRow.scope == scope))).one()
    return (int(row[0]), int(row[1] or 0), str(row[2]))


async def scopes(session: AsyncSession) -> list[str]:
    """The servers (and "" for the web and CLI) that have examples."""
    return list((await session.scalars(select(RouteExampleRow.scope).distinct())).all())


async def remove(session: AsyncSession, *, ids: list[int] | None = None, scope: str | None = None,
                 target: str | None = None) -> int:
    """Remove examples by id and/or every example of a server and/or a target (all filters given apply: a server's
    admin removes only their server's ids); returns how many went."""
    if not ids and scope is None and target is None:
        return 0
    statement = delete(RouteExampleRow)
    if ids:
        statement = statement.where(RouteExampleRow.id.in_(ids))
    if scope is not None:
        statement = statement.where(RouteExampleRow.scope == scope)
    if target is not None:
        statement = statement.where(RouteExampleRow.target == target)
    return (await session.execute(statement)).rowcount
