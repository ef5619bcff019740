"""Jobs and images as front doors show them (read from the database and the image store)."""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dreamloom.errors import NotFound
from storage import queue, votes
from storage.files import ImageStore
from storage.models import Image, Job


@dataclass
class ImageView:
    """An image as front doors show it."""

    id: int
    index: int
    seed: int
    width: int
    height: int
    path: Path
    up: int = 0
    down: int = 0


@dataclass
class JobView:
    """A job as front doors show it: status, place in the queue, estimated wait, images."""

    id: int
    kind: str
    status: str
    user_id: str
    raw_prompt: str
    prompt: str
    model: str | None
    seed: int | None
    parameters: dict[str, Any]
    settings: dict[str, Any] | None
    parent_image_id: int | None
    attempts: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    position: int | None = None  # 1 = the next job to start
    eta_seconds: float | None = None
    images: list[ImageView] = field(default_factory=list)
    guild_id: str | None = None
    channel_id: str | None = None
    message_id: str | None = None
    loras: list[Any] = field(default_factory=list)
    route_reason: str | None = None
    cached_from_job_id: int | None = None  # answered from the result cache with this job's pictures

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view."""
        data = dataclasses.asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        for image in data["images"]:
            image["path"] = str(image["path"])
        return data


async def find_job(session, job_id: int) -> Job:
    """The job row, or NotFound (a message safe to show)."""
    job = await session.get(Job, job_id)
    if job is None:
        raise NotFound(f"There is no job {job_id}.")
    return job


async def job_view(session, store: ImageStore, job: Job, with_position: bool = True) -> JobView:
    """A job row as front doors show it (its queue position and ETA only while queued, if `with_position`)."""
    images = (await session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index_in_job))).all()
    counts = await votes.tallies(session, [image.id for image in images])
    views = [ImageView(image.id, image.index_in_job, image.seed, image.width, image.height,
                       store.root / image.path, *counts[image.id]) for image in images]
    position = eta = None
    if with_position and job.status == "queued":
        position = await queue.queue_position(session, job) + 1  # people count from 1: "position 1" is next
        eta = position * await typical_duration(session, job.kind)
    return JobView(job.id, job.kind, job.status, job.user_id, job.raw_prompt, job.prompt, job.model, job.seed,
                   job.parameters, job.settings, job.parent_image_id, job.attempts, job.error, job.created_at,
                   job.finished_at, position, eta, views, job.guild_id, job.channel_id, job.message_id,
                   list(job.loras or []), job.route_reason, job.cached_from_job_id)


async def typical_duration(session, kind: str) -> float:
    """The median run time of the last 20 finished jobs of `kind` (5 s before there are any)."""
    rows = (await session.execute(select(Job.started_at, Job.finished_at).where(
        Job.status == "done", Job.kind == kind, Job.cached_from_job_id.is_(None)).order_by(Job.id.desc()).limit(20))).all()
    durations = [(finished - started).total_seconds() for started, finished in rows if started and finished]
    return round(statistics.median(durations), 2) if durations else 5.0
