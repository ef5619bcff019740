"""Progress events between processes on PostgreSQL: `LISTEN/NOTIFY` on one channel. A notification is small (the
job id, the event's kind, step and total, a short message, whether a preview was stored); the preview picture goes
through the `job_previews` table. SQLite has no such channel: there, events stay in the process that made them."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy import select, text

from storage.database import Database, dialect_insert
from storage.models import JobPreview, utcnow

log = logging.getLogger(__name__)
CHANNEL = "dreamloom_events"
MAX_MESSAGE = 300  # NOTIFY payloads must stay under 8000 bytes


async def notify(db: Database, payload: dict, preview_png: bytes | None = None) -> None:
    """Store the preview (if any) and send the notification, in one transaction: a listener that hears it can
    read the preview."""
    payload = {**payload, "message": (payload.get("message") or "")[:MAX_MESSAGE], "preview": preview_png is not None}
    async with db.session() as session:
        if preview_png is not None:
            values = {"step": int(payload.get("step") or 0), "png": preview_png, "updated_at": utcnow()}
            statement = dialect_insert(session, JobPreview.__table__).values(job_id=payload["job"], **values)
            await session.execute(statement.on_conflict_do_update(index_elements=["job_id"], set_=values))
        await session.execute(text("SELECT pg_notify(:channel, :payload)"),
                              {"channel": CHANNEL, "payload": json.dumps(payload, separators=(",", ":"))})


async def preview(db: Database, job_id: int) -> bytes | None:
    """The latest preview of a job, if one was stored."""
    async with db.reading() as connection:
        return await connection.scalar(select(JobPreview.png).where(JobPreview.job_id == job_id))


class Listener:
    """A dedicated connection that LISTENs on the channel and hands each payload (a dict), in order, to
    `handle`; it reconnects after a lost connection."""

    def __init__(self, db: Database, handle: Callable[[dict], Awaitable[None]]) -> None:
        self.db = db
        self.handle = handle
        self._payloads: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
        self._task: asyncio.Task | None = None
        self.ready = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        import asyncpg

        dsn = self.db.url.replace("postgresql+asyncpg://", "postgresql://", 1)
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(dsn)
                await connection.add_listener(CHANNEL, self._heard)
                self.ready.set()
                while not connection.is_closed():
                    try:
                        payload = await asyncio.wait_for(self._payloads.get(), 5)
                    except TimeoutError:
                        continue
                    try:
                        await self.handle(json.loads(payload))
                    except Exception:
                        log.exception("a progress notification could not be handled")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("listening for progress events failed (%s); retrying in 2 s", type(error).__name__)
                await asyncio.sleep(2)
            finally:
                self.ready.clear()
                if connection is not None and not connection.is_closed():
                    await asyncio.shield(connection.close())

    def _heard(self, connection, pid, channel, payload: str) -> None:
        try:
            self._payloads.put_nowait(payload)
        except asyncio.QueueFull:
            pass  # a front door far behind loses step events; the database still has the job's end
