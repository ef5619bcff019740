"""Progress events of running jobs: who follows a job (a Discord message, a web event stream) hears its steps,
previews and end. `InProcessEvents` delivers within this process (SQLite installs, where every part runs in one
process); `PostgresEvents` also relays them to every other process through PostgreSQL LISTEN/NOTIFY
(storage/events.py), so a front door hears a worker running elsewhere."""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass

from storage import events
from storage.database import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """Published while a job runs: `kind` is queued, started, step, done, failed or cancelled."""

    job_id: int
    kind: str
    step: int = 0
    total: int = 0
    preview_png: bytes | None = None
    message: str = ""


class InProcessEvents:
    """Subscribers by job, in this process. A slow subscriber loses old step events, never the end."""

    def __init__(self) -> None:
        self._subscribers: dict[int, set[asyncio.Queue]] = defaultdict(set)

    def subscribe(self, job_id: int) -> asyncio.Queue:
        """A queue of `ProgressEvent`s for one job; `unsubscribe` when done."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=256)
        self._subscribers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: int, queue: asyncio.Queue) -> None:
        """Stop receiving events for a job."""
        self._subscribers[job_id].discard(queue)
        if not self._subscribers[job_id]:
            self._subscribers.pop(job_id, None)

    def publish(self, event: ProgressEvent) -> None:
        """Deliver an event to the job's subscribers."""
        self._dispatch(event)

    async def listen(self, timeout: float = 10.0) -> bool:
        """Hear events from other processes: False here, where events stay in their process."""
        return False

    async def close(self) -> None:
        """Nothing to release in-process."""

    def _dispatch(self, event: ProgressEvent) -> None:
        for queue in list(self._subscribers.get(event.job_id, ())):
            if queue.full():
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    pass
            queue.put_nowait(event)


class PostgresEvents(InProcessEvents):
    """In-process delivery, plus NOTIFY to other processes (in order, through one relay task) and LISTEN for theirs."""

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db
        self._origin = secrets.token_hex(8)  # this process's own notifications come back; they are skipped
        self._relay: asyncio.Queue | None = None
        self._relay_task: asyncio.Task | None = None
        self._listener: events.Listener | None = None

    def publish(self, event: ProgressEvent) -> None:
        """Deliver an event here and queue it for every other process."""
        self._dispatch(event)
        if self._relay is None:
            self._relay = asyncio.Queue(maxsize=10_000)
            self._relay_task = asyncio.get_running_loop().create_task(self._relay_events(self._relay))
        try:
            self._relay.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("progress relay is full; event of job %s not sent to other processes", event.job_id)

    async def _relay_events(self, relay: asyncio.Queue) -> None:
        while True:
            event = await relay.get()
            payload = {"origin": self._origin, "job": event.job_id, "kind": event.kind, "step": event.step,
                       "total": event.total, "message": event.message}
            try:
                await events.notify(self.db, payload, event.preview_png)
            except Exception:
                log.warning("progress event of job %s not sent to other processes", event.job_id, exc_info=True)
            finally:
                relay.task_done()

    async def listen(self, timeout: float = 10.0) -> bool:
        """Hear progress events from other processes (a front door calls this). True once listening."""
        if self._listener is None:
            self._listener = events.Listener(self.db, self._heard)
            self._listener.start()
        try:
            await asyncio.wait_for(self._listener.ready.wait(), timeout)
        except TimeoutError:
            log.warning("not listening for progress events yet; the listener keeps trying")
            return False
        return True

    async def _heard(self, payload: dict) -> None:
        if payload.get("origin") == self._origin:
            return  # this process delivered it already
        job_id = int(payload["job"])
        if job_id not in self._subscribers:
            return
        preview = await events.preview(self.db, job_id) if payload.get("preview") else None
        self._dispatch(ProgressEvent(job_id, payload["kind"], int(payload.get("step") or 0),
                                     int(payload.get("total") or 0), preview, payload.get("message") or ""))

    async def close(self) -> None:
        """Send the events still waiting to be relayed (for up to 5 s), then stop listening."""
        if self._relay is not None:
            try:
                await asyncio.wait_for(self._relay.join(), 5)
            except TimeoutError:
                pass
            self._relay_task.cancel()
            await asyncio.gather(self._relay_task, return_exceptions=True)
            self._relay = None
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
