"""Worker heartbeats: each worker process upserts its row every few seconds; the live ones are those heard from
recently. A worker that stops cleanly removes its row; one that dies just goes quiet (its job's lease runs out)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.database import dialect_insert
from storage.models import WorkerRow, utcnow

HEARTBEAT_S = 5.0  # a worker writes its heartbeat this often
ALIVE_WITHIN_S = 3 * HEARTBEAT_S  # and counts as alive for three of them


@dataclass(frozen=True)
class Heartbeat:
    """What a worker reports about itself."""

    worker_id: str
    host: str
    pid: int
    device: str
    models: list[str] = field(default_factory=list)
    current_job_id: int | None = None
    memory_mb: float | None = None


async def beat(session: AsyncSession, heartbeat: Heartbeat, now: datetime | None = None) -> None:
    """Record that the worker is alive (insert or update its row)."""
    now = now or utcnow()
    values: dict[str, Any] = {"host": heartbeat.host[:200], "pid": heartbeat.pid, "device": heartbeat.device[:50],
                              "models": list(heartbeat.models), "current_job_id": heartbeat.current_job_id,
                              "memory_mb": heartbeat.memory_mb, "heartbeat_at": now}
    statement = dialect_insert(session, WorkerRow.__table__).values(id=heartbeat.worker_id, started_at=now, **values)
    await session.execute(statement.on_conflict_do_update(index_elements=["id"], set_=values))
    # Workers that died long ago (no clean stop) leave the table here, on a write, not on every status read.
    await session.execute(delete(WorkerRow).where(WorkerRow.heartbeat_at < now - timedelta(days=1)))


async def alive(session: AsyncSession, within_seconds: float = ALIVE_WITHIN_S,
                now: datetime | None = None) -> list[WorkerRow]:
    """Workers heard from in the last `within_seconds`, oldest first."""
    now = now or utcnow()
    rows = await session.scalars(select(WorkerRow).where(WorkerRow.heartbeat_at >= now - timedelta(seconds=within_seconds))
                                 .order_by(WorkerRow.started_at, WorkerRow.id))
    return list(rows.all())


async def gone(session: AsyncSession, worker_id: str) -> None:
    """A worker that stops cleanly leaves the list at once."""
    await session.execute(delete(WorkerRow).where(WorkerRow.id == worker_id))
