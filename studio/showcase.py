"""What the community sees: the gallery, image pages, lineage and result files, under one visibility rule."""
from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path
from typing import Any, Callable

from PIL import PngImagePlugin
from sqlalchemy import select

from dreamloom.errors import InvalidRequest, NotFound
from engine.images import make_grid, open_image
from engine.registry import Registry
from storage import queue
from storage.database import Database, uninterrupted
from storage.files import ImageStore
from storage.gallery import GalleryItem, GalleryQuery, gallery_page, public_guilds
from storage.models import Image, Job
from studio.settings import Settings
from studio.views import JobView, find_job, job_view


class Showcase:
    """The gallery, image pages, lineage and result files. `registry()` gives the current model registry (the
    owner may reload it): images of models tagged `nsfw` stay hidden unless the settings show them."""

    def __init__(self, db: Database, store: ImageStore, settings: Settings, registry: Callable[[], Registry]) -> None:
        self.db = db
        self.store = store
        self.settings = settings
        self.registry = registry

    @uninterrupted
    async def lineage(self, image_id: int) -> dict[str, Any]:
        """An image's ancestors (the grids it came from) and descendants (its upscales and variations)."""
        async with self.db.session() as session:
            image = await session.get(Image, image_id)
            if image is None:
                raise NotFound(f"There is no image {image_id}.")
            ancestors, current = [], image
            while current.parent_image_id is not None and len(ancestors) < 100:
                current = await session.get(Image, current.parent_image_id)
                ancestors.append({"image_id": current.id, "job_id": current.job_id})
            descendants, frontier = [], [image.id]
            while frontier and len(descendants) < 1000:
                children = (await session.scalars(select(Image).where(Image.parent_image_id.in_(frontier)))).all()
                descendants += [{"image_id": c.id, "job_id": c.job_id, "parent_image_id": c.parent_image_id} for c in children]
                frontier = [c.id for c in children]
            return {"image_id": image.id, "job_id": image.job_id, "ancestors": ancestors, "descendants": descendants}

    def hidden_models(self) -> tuple[str, ...]:
        """Models whose images the gallery does not show (tagged `nsfw`, unless configured to)."""
        if self.settings.gallery_show_nsfw:
            return ()
        return tuple(sorted(name for name, spec in self.registry().models.items() if "nsfw" in spec.tags))

    @uninterrupted
    async def gallery(self, query: GalleryQuery) -> tuple[list[GalleryItem], bool]:
        """A page of the community gallery (and whether more follow)."""
        query = dataclasses.replace(query, hidden_models=self.hidden_models())
        async with self.db.session() as session:
            return await gallery_page(session, query)

    async def discord_gallery(self, guild_id: str | None, period: str, page: int,
                              model: str | None) -> tuple[list[GalleryItem], bool]:
        """One image per page of a server's gallery (its own images), ranked like the web gallery."""
        return await self.gallery(GalleryQuery(period=period, page=page, per_page=1, model=model,
                                               guild_id=guild_id).check())

    @uninterrupted
    async def gallery_file(self, image_id: int, max_bytes: int) -> tuple[str, bytes]:
        """One stored image as a file for chat, re-encoded to fit `max_bytes`."""
        async with self.db.session() as session:
            image = await session.get(Image, image_id)
        if image is None:
            raise NotFound(f"There is no image {image_id}.")
        return await asyncio.to_thread(_encode_to_fit, [self.store.root / image.path], image.job_id, max_bytes)

    @uninterrupted
    async def starboard_image(self, image_id: int) -> dict[str, Any]:
        """What a starboard repost shows: prompt, author and votes."""
        async with self.db.session() as session:
            image = await session.get(Image, image_id)
            job = await session.get(Job, image.job_id) if image else None
            if job is None:
                raise NotFound(f"There is no image {image_id}.")
            return {"prompt": job.prompt, "user_id": job.user_id, "up": image.up_votes, "down": image.down_votes}

    @uninterrupted
    async def public_job(self, job_id: int, viewer_guilds: tuple[str, ...] = ()) -> JobView:
        """A job as the web may see it: not from a banned member, a hidden model or a private guild (unless the
        signed-in viewer belongs to that guild: `viewer_guilds`)."""
        async with self.db.session() as session:
            job = await session.get(Job, job_id)
            if not await self._public(session, job, viewer_guilds):
                raise NotFound(f"There is no job {job_id}.")
            return await job_view(session, self.store, job)

    async def _public(self, session, job: Job | None, viewer_guilds: tuple[str, ...] = ()) -> bool:
        """The web's one visibility rule: not a banned member's, not a hidden model's, not a private guild's
        (a guild's own members see its images)."""
        if job is None or job.model in self.hidden_models():
            return False
        owner = await session.get(queue.User, job.user_id)
        return not owner.banned and (job.guild_id is None or job.guild_id in viewer_guilds
                                     or job.guild_id in await public_guilds(session))

    @uninterrupted
    async def image_detail(self, image_id: int, viewer_guilds: tuple[str, ...] = ()) -> dict[str, Any]:
        """Everything an image page shows; images the gallery hides (from this viewer) are not found."""
        async with self.db.session() as session:
            image = await session.get(Image, image_id)
            job = await session.get(Job, image.job_id) if image else None
            if job is None or job.status != "done" or not await self._public(session, job, viewer_guilds):
                raise NotFound(f"There is no image {image_id}.")
            siblings = (await session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index_in_job))).all()
            children = (await session.execute(select(Image.id, Job.kind).join(Job, Image.job_id == Job.id)
                                              .where(Image.parent_image_id == image.id, Job.status == "done")
                                              .order_by(Image.id))).all()
        return {
            "id": image.id, "job_id": job.id, "index": image.index_in_job, "seed": image.seed, "width": image.width,
            "height": image.height, "sha256": image.sha256, "path": image.path, "created_at": image.created_at.isoformat(),
            "up": image.up_votes, "down": image.down_votes, "score": round(image.score, 4), "user_id": job.user_id,
            "kind": job.kind, "prompt": job.prompt, "raw_prompt": job.raw_prompt, "negative_prompt": job.negative_prompt,
            "model": job.model, "loras": job.loras, "route_reason": job.route_reason, "settings": job.settings or {},
            "parent_image_id": image.parent_image_id,
            "siblings": [{"id": s.id, "index": s.index_in_job} for s in siblings if s.id != image.id],
            "children": [{"id": child_id, "kind": kind} for child_id, kind in children],
        }

    async def result_file(self, job_id: int, max_bytes: int) -> tuple[str, bytes]:
        """A finished job's images as one file for chat (a 2x2 grid, or the single image), re-encoded to fit
        `max_bytes`: PNG when it fits, else WebP at falling quality, then smaller."""
        async with self.db.session() as session:
            view = await job_view(session, self.store, await find_job(session, job_id), with_position=False)
        if view.kind == "learn" and view.status == "done" and (view.settings or {}).get("before_after"):
            # A learning job's picture: the base and the learned style on the same held-out prompts and seeds.
            sheet = self.settings.data_dir / view.settings["before_after"]
            if sheet.is_file():
                return await asyncio.to_thread(_encode_to_fit, [sheet], job_id, max_bytes)
        if view.status != "done" or not view.images:
            raise InvalidRequest(f"Job {job_id} has no images yet.")
        return await asyncio.to_thread(_encode_to_fit, [image.path for image in view.images], job_id, max_bytes)


def _encode_to_fit(paths: list[Path], job_id: int, max_bytes: int) -> tuple[str, bytes]:
    images = [open_image(path, max_pixels=8192 * 8192, max_bytes=2**30) for path in paths]
    picture = make_grid(images)
    # A PNG keeps the parameters (A1111's `parameters` text, and ours) of its first image, as A1111's own grids do,
    # so a file saved from Discord opens with its prompt and seed in other tools.
    info = PngImagePlugin.PngInfo()
    for key in ("parameters", "dreamloom"):
        if isinstance(images[0].info.get(key), str):
            info.add_text(key, images[0].info[key])
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info)
    if buffer.tell() <= max_bytes:
        return f"dreamloom-{job_id}.png", buffer.getvalue()
    for scale in (1.0, 0.75, 0.5, 0.35, 0.25, 0.125):
        resized = picture if scale == 1.0 else picture.resize(
            (max(1, int(picture.width * scale)), max(1, int(picture.height * scale))))
        for quality in (90, 75, 55):
            buffer = io.BytesIO()
            resized.save(buffer, format="WEBP", quality=quality)
            if buffer.tell() <= max_bytes:
                return f"dreamloom-{job_id}.webp", buffer.getvalue()
    raise InvalidRequest(f"The result of job {job_id} cannot be made smaller than {max_bytes} bytes.")
