"""The job queue is a table: fair claiming under a lease, idempotent completion, recovery after a crash.

Order: upscales first (they are short), then round-robin across users: the user served
least recently gets their oldest queued job. Every query is index-backed, so claiming
stays flat as the tables grow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dreamloom.errors import LimitReached, NotAllowed, NotFound
from storage.database import dialect_insert
from storage.models import Image, Job, JobLora, User, utcnow

UPSCALE_PRIORITY = 1


@dataclass(frozen=True)
class NewJob:
    """What a front door submits; `parameters` is the parsed prompt."""

    kind: str
    user_id: str
    raw_prompt: str
    prompt: str = ""
    negative_prompt: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    loras: list[Any] = field(default_factory=list)
    route_reason: str | None = None
    seed: int | None = None
    guild_id: str | None = None
    channel_id: str | None = None
    message_id: str | None = None
    parent_image_id: int | None = None
    max_attempts: int = 3
    result_key: str | None = None  # see Job.result_key


@dataclass(frozen=True)
class NewImage:
    """An image a finished job produced, already written to the image store."""

    index_in_job: int
    seed: int
    width: int
    height: int
    sha256: str
    path: str
    parent_image_id: int | None = None


async def ensure_user(session: AsyncSession, user_id: str, display_name: str = "", *, lock: bool = False) -> User:
    """The user row, created on first sight; `lock` holds it (FOR UPDATE on PostgreSQL) until the unit of work ends.

    Two front doors (or two clicks) may see a new member at the same moment: the row is inserted with ON CONFLICT DO
    NOTHING and read back, so the second one finds the first's row instead of failing on the primary key.
    """
    statement = select(User).where(User.id == user_id)
    if lock:
        statement = statement.with_for_update()
    user = await session.scalar(statement)
    if user is None:
        await session.execute(dialect_insert(session, User.__table__).values(
            id=user_id, display_name=display_name or user_id, defaults={}, banned=False, queued_count=0,
            created_at=utcnow()).on_conflict_do_nothing(index_elements=["id"]))
        user = await session.scalar(statement.execution_options(populate_existing=True))
    return user


async def enqueue(session: AsyncSession, new: NewJob, *, max_queued_per_user: int, daily_quota: int | None = None,
                  now: datetime | None = None) -> Job:
    """Insert a queued job after checking the user's limits."""
    now = now or utcnow()
    # Locked: two submits of one member at once must not both pass the queue limit.
    user = await ensure_user(session, new.user_id, lock=True)
    if user.banned:
        raise NotAllowed("You are banned from generating images here.")
    if user.queued_count >= max_queued_per_user:
        raise LimitReached(f"You already have {user.queued_count} jobs queued (the limit is {max_queued_per_user}); "
                           "wait for them to finish or cancel one.")
    quota = user.daily_quota if user.daily_quota is not None else daily_quota
    if quota is not None:
        since = now - timedelta(days=1)
        used = await session.scalar(select(func.count()).select_from(Job).where(
            Job.user_id == new.user_id, Job.created_at >= since, Job.status != "cancelled"))
        if used >= quota:
            raise LimitReached(f"You have used your daily quota of {quota} jobs; it frees up over the next 24 hours.")
    job = Job(
        kind=new.kind, status="queued", priority=UPSCALE_PRIORITY if new.kind == "upscale" else 0, user_id=new.user_id,
        guild_id=new.guild_id, channel_id=new.channel_id, message_id=new.message_id, parent_image_id=new.parent_image_id,
        raw_prompt=new.raw_prompt, prompt=new.prompt, negative_prompt=new.negative_prompt, parameters=new.parameters,
        model=new.model, loras=new.loras, route_reason=new.route_reason, seed=new.seed, attempts=0,
        max_attempts=new.max_attempts, cancel_requested=False, created_at=now, result_key=new.result_key,
    )
    session.add(job)
    await session.execute(update(User).where(User.id == new.user_id).values(queued_count=User.queued_count + 1))
    await session.flush()
    _add_job_loras(session, job.id, new.loras)
    return job


def _add_job_loras(session: AsyncSession, job_id: int, loras: list[Any]) -> None:
    """One `job_loras` row per LoRA name of a job (what the per-LoRA gallery pages look up)."""
    names = {entry["name"] for entry in loras if isinstance(entry, dict) and entry.get("name")}
    session.add_all(JobLora(job_id=job_id, name=name) for name in sorted(names))


def add_images(session: AsyncSession, job_id: int, images: list[NewImage], now: datetime) -> None:
    """The rows of a job's images, whose files are already in the store."""
    session.add_all(Image(job_id=job_id, index_in_job=i.index_in_job, parent_image_id=i.parent_image_id, seed=i.seed,
                          width=i.width, height=i.height, sha256=i.sha256, path=i.path, created_at=now) for i in images)


async def record_finished(session: AsyncSession, new: NewJob, settings: dict[str, Any], started_at: datetime,
                          now: datetime | None = None) -> Job:
    """Keep a generation that ran outside the queue (the owner's command line) as a finished job; its images are
    added with `add_images` once their files, which name the job, are stored. No queue limit applies."""
    now = now or utcnow()
    await ensure_user(session, new.user_id)
    seeds = settings.get("seeds") or [new.seed]
    job = Job(
        kind=new.kind, status="done", priority=0, user_id=new.user_id, parent_image_id=new.parent_image_id,
        raw_prompt=new.raw_prompt, prompt=new.prompt, negative_prompt=new.negative_prompt, parameters=new.parameters,
        model=settings.get("model") or new.model, loras=new.loras, route_reason=new.route_reason, seed=seeds[0],
        attempts=1, max_attempts=new.max_attempts, cancel_requested=False, created_at=started_at,
        started_at=started_at, finished_at=now, settings=settings,
    )
    session.add(job)
    await session.flush()
    _add_job_loras(session, job.id, new.loras)
    return job


MAX_AFFINITY_SKIPS = 3  # how often the fair next job may be passed over for one on a model a worker has loaded


async def _next_candidate(session: AsyncSession, lock: bool, exclude_kinds: tuple[str, ...] = (),
                          loaded_models: tuple[str, ...] = ()) -> int | None:
    def first(statement):
        if exclude_kinds:
            statement = statement.where(Job.kind.not_in(exclude_kinds))
        statement = statement.limit(1)
        return statement.with_for_update(skip_locked=True) if lock else statement

    # 1. Upscales first: they are short and someone is waiting on a grid they already saw.
    job_id = await session.scalar(first(select(Job.id).where(Job.status == "queued", Job.priority >= UPSCALE_PRIORITY)
                                        .order_by(Job.priority.desc(), Job.id)))
    if job_id is not None:
        return job_id
    # 2. Round-robin: the user served least recently, then their oldest queued job.
    users = (await session.scalars(select(User.id).where(User.queued_count > 0)
                                   .order_by(User.last_served_at.asc().nulls_first(), User.id).limit(8))).all()
    fair = None
    for user_id in users:
        row = (await session.execute(first(select(Job.id, Job.model, Job.affinity_skips)
                                           .where(Job.user_id == user_id, Job.status == "queued").order_by(Job.id)))).first()
        if row is None:
            continue
        if fair is None:
            fair = row
            # 3. Model affinity: the fair job runs here if this worker has its model loaded (or has none loaded),
            #    or once it has been passed over MAX_AFFINITY_SKIPS times; else the next user's job on a loaded model.
            if not loaded_models or row.model in loaded_models or row.affinity_skips >= MAX_AFFINITY_SKIPS:
                return row.id
            continue
        if row.model in loaded_models:
            await session.execute(update(Job).where(Job.id == fair.id).values(affinity_skips=Job.affinity_skips + 1))
            return row.id
    return fair.id if fair is not None else None


async def claim(session: AsyncSession, worker: str, lease_seconds: float, *, lock: bool = False,
                now: datetime | None = None, exclude_kinds: tuple[str, ...] = (),
                loaded_models: tuple[str, ...] = ()) -> Job | None:
    """Take the next job under a lease, or None when the queue is empty.

    `lock=True` (PostgreSQL) selects with FOR UPDATE SKIP LOCKED so concurrent workers never
    wait on each other; on SQLite the conditional UPDATE below is the atomic step. `exclude_kinds`: what a
    worker already running a job of that kind (a learning job between its slices) must not take. `loaded_models`:
    the models the worker holds; a job on one of them may go before the fair next job (model affinity, bounded).
    """
    now = now or utcnow()
    for _ in range(8):
        job_id = await _next_candidate(session, lock, exclude_kinds, loaded_models)
        if job_id is None:
            return None
        # The conditional UPDATE is the claim; RETURNING hands back the row without another round trip.
        job = (await session.scalars(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="running", lease_owner=worker, lease_expires_at=now + timedelta(seconds=lease_seconds),
                    attempts=Job.attempts + 1, started_at=now)
            .returning(Job).execution_options(populate_existing=True)
        )).one_or_none()
        if job is not None:
            await session.execute(update(User).where(User.id == job.user_id)
                                  .values(queued_count=User.queued_count - 1, last_served_at=now))
            return job
    return None


async def renew_lease(session: AsyncSession, job_id: int, worker: str, lease_seconds: float) -> bool:
    """Extend the lease of a running job; False when the lease was lost (the job must stop)."""
    result = await session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.lease_owner == worker)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)))
    return result.rowcount == 1


async def complete(session: AsyncSession, job_id: int, worker: str, images: list[NewImage],
                   settings: dict[str, Any], now: datetime | None = None) -> bool:
    """Mark a running job done with its images, once: a repeated or late completion changes nothing."""
    now = now or utcnow()
    seeds = settings.get("seeds") or [None]
    result = await session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.lease_owner == worker)
        .values(status="done", finished_at=now, settings=settings, model=settings.get("model"), seed=seeds[0],
                lease_owner=None, lease_expires_at=None, error=None))
    if result.rowcount != 1:
        return False
    add_images(session, job_id, images, now)
    return True


async def cached_result(session: AsyncSession, result_key: str) -> tuple[Job, list[Image]] | None:
    """The latest finished job with this result key, and its images (None when there is none)."""
    job = await session.scalar(select(Job).where(Job.result_key == result_key, Job.status == "done",
                                                 Job.cached_from_job_id.is_(None)).order_by(Job.id.desc()).limit(1))
    if job is None:
        return None
    images = (await session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index_in_job))).all()
    return (job, list(images)) if images else None


async def complete_from_cache(session: AsyncSession, job: Job, source: Job, images: list[Image],
                              now: datetime | None = None) -> None:
    """Finish a just-queued job with the pictures `source` made (new rows on the same stored files)."""
    now = now or utcnow()
    job.status, job.started_at, job.finished_at, job.attempts = "done", now, now, 1
    job.settings, job.cached_from_job_id = {**(source.settings or {}), "cache_hit": source.id}, source.id
    await session.execute(update(User).where(User.id == job.user_id).values(queued_count=User.queued_count - 1))
    add_images(session, job.id, [NewImage(i.index_in_job, i.seed, i.width, i.height, i.sha256, i.path,
                                          parent_image_id=job.parent_image_id) for i in images], now)


async def fail(session: AsyncSession, job_id: int, worker: str, error: str, *, retry: bool,
               cancelled: bool = False) -> str | None:
    """End a running job: back to the queue when `retry` and attempts remain, else failed (or cancelled)."""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != "running" or job.lease_owner != worker:
        return None
    if cancelled:
        status = "cancelled"
    elif retry and job.attempts < job.max_attempts:
        status = "queued"
    else:
        status = "failed"
    job.status, job.error = status, error
    job.lease_owner = job.lease_expires_at = None
    if status == "queued":
        await session.execute(update(User).where(User.id == job.user_id).values(queued_count=User.queued_count + 1))
    else:
        job.finished_at = utcnow()
    return status


async def release(session: AsyncSession, job_id: int, worker: str, note: str) -> bool:
    """Put a running job back in the queue without counting the run as an attempt (a learning job paused at a
    checkpoint by a shutdown resumes from it later)."""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != "running" or job.lease_owner != worker:
        return False
    job.status, job.error, job.attempts = "queued", note, max(0, job.attempts - 1)
    job.lease_owner = job.lease_expires_at = None
    await session.execute(update(User).where(User.id == job.user_id).values(queued_count=User.queued_count + 1))
    return True


async def record_progress(session: AsyncSession, job_id: int, worker: str, progress: dict[str, Any]) -> None:
    """Keep a long job's progress on its row, where other processes (the CLI, another front door) read it."""
    await session.execute(update(Job).where(Job.id == job_id, Job.status == "running", Job.lease_owner == worker)
                          .values(settings={"progress": progress}))


async def requeue_orphans(session: AsyncSession, *, owner_prefix: str | None = None, now: datetime | None = None,
                          lock: bool = False) -> list[int]:
    """Running jobs whose lease expired (or whose owner on this host is gone): back to the queue, or failed
    after `max_attempts`. Returns the ids put back in the queue. `lock=True` (PostgreSQL): rows another worker is
    requeueing at the same moment are skipped, so a job is never put back twice."""
    now = now or utcnow()
    condition = Job.lease_expires_at < now
    if owner_prefix:
        condition = condition | Job.lease_owner.startswith(owner_prefix)
    statement = select(Job).where(Job.status == "running", condition)
    if lock:
        statement = statement.with_for_update(skip_locked=True)
    orphans = (await session.scalars(statement.execution_options(populate_existing=True))).all()
    requeued = []
    for job in orphans:
        job.lease_owner = job.lease_expires_at = None
        if job.attempts >= job.max_attempts:
            job.status, job.finished_at = "failed", now
            job.error = f"Stopped after {job.attempts} attempts (the worker died each time)."
        else:
            job.status = "queued"
            requeued.append(job.id)
            await session.execute(update(User).where(User.id == job.user_id).values(queued_count=User.queued_count + 1))
    return requeued


async def cancel(session: AsyncSession, job_id: int, user_id: str | None) -> Job:
    """Cancel a queued job now, or ask a running one to stop; only its owner (or an admin: `user_id=None`) may."""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"There is no job {job_id}.")
    if user_id is not None and job.user_id != user_id:
        raise NotAllowed(f"Job {job_id} is not yours to cancel.")
    if job.status == "queued":
        job.status, job.finished_at, job.error = "cancelled", utcnow(), "Cancelled by the user."
        await session.execute(update(User).where(User.id == job.user_id).values(queued_count=User.queued_count - 1))
    elif job.status == "running":
        job.cancel_requested = True
    return job


async def queue_position(session: AsyncSession, job: Job) -> int:
    """How many jobs will start before this one (0: it is next), under the fair order."""
    if job.status != "queued":
        return 0
    if job.priority >= UPSCALE_PRIORITY:
        return await session.scalar(select(func.count()).select_from(Job).where(
            Job.status == "queued", Job.priority >= UPSCALE_PRIORITY, Job.id < job.id))
    upscales = await session.scalar(select(func.count()).select_from(Job).where(
        Job.status == "queued", Job.priority >= UPSCALE_PRIORITY))
    # The job's rank among its owner's queued jobs; each other user gets at most that many turns first.
    rank = await session.scalar(select(func.count()).select_from(Job).where(
        Job.user_id == job.user_id, Job.status == "queued", Job.id < job.id)) + 1
    rows = (await session.execute(select(User.queued_count).where(User.queued_count > 0, User.id != job.user_id))).scalars()
    others = sum(min(count, rank) for count in rows)
    return upscales + others + rank - 1
