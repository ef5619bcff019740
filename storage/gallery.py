"""Gallery queries: the community's images ranked by votes, with privacy filters."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from dreamloom.errors import InvalidRequest
from storage.models import NOT_GALLERY_KINDS, Guild, Image, Job, JobLora, User, utcnow
from storage.ranking import rank_key

PERIODS = {"day": timedelta(days=1), "week": timedelta(days=7), "all": None, "new": None}
MAX_PAGE = 1000
MAX_PER_PAGE = 100
ID_CHUNK = 5000  # ids per IN (...) list, well under SQLite's limit on bound parameters


@dataclass(frozen=True)
class GalleryItem:
    """One image on a gallery page."""

    image_id: int
    job_id: int
    prompt: str
    model: str | None
    user_id: str
    up: int
    down: int
    score: float
    width: int
    height: int
    path: str
    created_at: datetime


@dataclass(frozen=True)
class GalleryQuery:
    """What a gallery page shows: a period, optional model / LoRA / member / guild, and what stays hidden."""

    period: str = "day"
    page: int = 1
    per_page: int = 24
    model: str | None = None
    lora: str | None = None
    user_id: str | None = None
    guild_id: str | None = None
    hidden_models: tuple[str, ...] = ()
    viewer_guilds: tuple[str, ...] = ()  # a signed-in member's servers: their private galleries are shown too

    def check(self) -> GalleryQuery:
        """Refuse out-of-range pages and unknown periods (front doors answer 400)."""
        if self.period not in PERIODS:
            raise InvalidRequest(f"period must be one of {', '.join(PERIODS)}; got {self.period!r}.")
        if not 1 <= self.page <= MAX_PAGE:
            raise InvalidRequest(f"page must be from 1 to {MAX_PAGE}; got {self.page}.")
        if not 1 <= self.per_page <= MAX_PER_PAGE:
            raise InvalidRequest(f"per_page must be from 1 to {MAX_PER_PAGE}; got {self.per_page}.")
        return self


async def public_guilds(session: AsyncSession) -> list[str]:
    """Guilds that opted into the public gallery."""
    guilds = (await session.scalars(select(Guild))).all()
    return [g.id for g in guilds if g.settings.get("public_gallery")]


async def gallery_page(session: AsyncSession, query: GalleryQuery, now: datetime | None = None) -> tuple[list[GalleryItem], bool]:
    """One page of images and whether another page follows."""
    query.check()
    now = now or utcnow()
    # No join with users: SQLite would drive the query from that small table through every job of every
    # member. Banned members are few, so their ids filter instead.
    banned = select(User.id).where(User.banned.is_(True))
    # No `jobs.status = 'done'` either: image rows only exist for done jobs (they are inserted by the
    # completing transaction), and that condition would tempt SQLite to start from the status index.
    statement = (select(Image, Job.prompt, Job.model, Job.user_id)
                 .join(Job, Image.job_id == Job.id)
                 .where(Job.user_id.not_in(banned), Job.kind.not_in(NOT_GALLERY_KINDS)))
    if query.hidden_models:
        statement = statement.where(or_(Job.model.is_(None), Job.model.not_in(query.hidden_models)))
    if query.guild_id:
        statement = statement.where(Job.guild_id == query.guild_id)
    else:
        # The public gallery: local (CLI, web) images and guilds that opted in.
        visible = [*await public_guilds(session), *query.viewer_guilds]
        statement = statement.where(or_(Job.guild_id.is_(None), Job.guild_id.in_(visible)))
    if query.model:
        statement = statement.where(Job.model == query.model)
    if query.user_id:
        statement = statement.where(Job.user_id == query.user_id)
    else:
        # A result-cache hit has rows of its own for the same files (its member votes on them): the community's
        # pages show each picture once, as the job that made it; a member's own page keeps their copies.
        statement = statement.where(Job.cached_from_job_id.is_(None))
    start = (query.page - 1) * query.per_page
    window = PERIODS[query.period]
    order = (Image.id.desc(),) if query.period == "new" else (Image.score.desc(), Image.id.desc())
    # Enough ranked candidates for this page; for today / this week more, since the decay re-ranks them.
    need = start + query.per_page + 1 if window is None else max(200, 4 * (start + query.per_page + 1))
    limit = need + need // 2 + 50
    while True:
        # Two steps, so the images index drives on every database: the next `limit` ids in ranked order,
        # then the joins and privacy filters on those rows alone, fetched by primary key.
        candidates = select(Image.id).order_by(*order).limit(limit)
        if window is not None:
            candidates = candidates.where(Image.created_at >= now - window)
        if query.lora:
            # Filtered while choosing candidates: a rarely used LoRA would otherwise need many rounds of them.
            candidates = candidates.where(Image.job_id.in_(select(JobLora.job_id).where(JobLora.name == query.lora)))
        ids = list((await session.scalars(candidates)).all())
        rows = []
        for chunk in range(0, len(ids), ID_CHUNK):
            rows += (await session.execute(statement.where(Image.id.in_(ids[chunk:chunk + ID_CHUNK])))).all()
        if len(rows) >= need or len(ids) < limit or limit >= 200_000:
            break
        limit *= 4  # the filters removed many candidates: look further
    # Ordered here: the second query only holds the candidates.
    if query.period == "new":
        rows.sort(key=lambda row: -row[0].id)
    elif window is None:
        rows.sort(key=lambda row: (-row[0].score, -row[0].id))
    else:
        rows.sort(key=lambda row: rank_key(row[0].up_votes, row[0].down_votes, row[0].created_at, now, query.period))
    rows = rows[start:start + query.per_page + 1]
    items = [GalleryItem(image.id, image.job_id, prompt, model, user_id, image.up_votes, image.down_votes, image.score,
                         image.width, image.height, image.path, image.created_at)
             for image, prompt, model, user_id in rows[: query.per_page]]
    return items, len(rows) > query.per_page
