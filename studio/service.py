"""The studio: the application services that every front door (CLI, Discord bot, web gallery) calls."""
from __future__ import annotations

import asyncio
import io
import logging
import re
import dataclasses
import random
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dreamloom.errors import DreamloomError, InvalidRequest, NotFound
from engine.compare import CompareRequest, cells as compare_cells, parse_axes
from engine.hashes import FileHashes
from engine.recipe import MergeRecipe
from engine.images import open_image
from engine.params import apply_defaults, check_image_weight, parse_prompt
from engine.registry import Registry, load_registry
from engine.routing import prepare_routing
from storage import queue, sessions, votes, workers
from storage.database import Database, sqlite_url, uninterrupted
from storage.export import ExportFilter, ExportReport, KohyaLayout, export_dataset
from storage.files import ImageStore
from storage.models import Image, Job, utcnow
from studio.events import InProcessEvents, PostgresEvents, ProgressEvent
from studio.community import Community
from studio.guilds import Guilds, GuildSettings
from studio.learning import LearningMixin
from studio.routing import RoutingMixin
from studio.metrics import ProcessMetrics
from studio.outputs import image_pngs
from studio.result_cache import result_key
from studio.settings import Settings
from studio.showcase import Showcase
from studio.signin import SignIn
from studio.views import JobView, find_job, job_view, typical_duration

TERMINAL = ("done", "failed", "cancelled")
log = logging.getLogger(__name__)


class Studio(LearningMixin, RoutingMixin):
    """The jobs-and-queue service over one database and one image store (submit, cancel, reroll, status, export),
    with routing (studio/routing.py) and learned styles (studio/learning.py); it holds the narrower services front
    doors reach through it: `events`, `guilds`, `community`, `showcase` and `sign_in`."""

    def __init__(self, settings: Settings, db: Database, store: ImageStore, registry: Registry) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.registry = registry
        # Jobs a worker of this process runs, by id: the event stops the job at its next step.
        self.running_jobs: dict[int, threading.Event] = {}
        self._rng = random.SystemRandom()
        self._registry_mtime = Path(settings.registry).stat().st_mtime_ns if Path(settings.registry).is_file() else None
        self.learned_loras = {}
        self._active_styles = {}
        self._route_memory = {}
        self.file_hashes = FileHashes(settings.cache_dir / "file-hashes.json")
        # Progress events: in this process on SQLite; to and from every process on PostgreSQL (LISTEN/NOTIFY).
        self.events = InProcessEvents() if db.is_sqlite else PostgresEvents(db)
        self.guilds = Guilds(db)
        self.community = Community(db, settings, on_verified_up_vote=self.learn_route_example)
        self.sign_in = SignIn(db, settings)
        self.showcase = Showcase(db, store, settings, lambda: self.registry)
        self.metrics = ProcessMetrics()

    @classmethod
    async def open(cls, settings: Settings) -> Studio:
        """Connect, apply migrations, open the image store and the model registry."""
        db = Database(settings.database_url or sqlite_url(settings.data_dir))
        await db.upgrade()
        studio = cls(settings, db, ImageStore(settings.images_dir), load_registry(settings.registry))
        await studio.load_learned_styles()
        return studio

    @uninterrupted
    async def status(self) -> dict[str, Any]:
        """The live workers (heard from in the last three heartbeats: host, device, loaded models, current job,
        memory), the queue's depth and how long it will take to clear."""
        async with self.db.session() as session:
            rows = await workers.alive(session)
            counts = dict((await session.execute(select(Job.status, func.count()).where(
                Job.status.in_(("queued", "running"))).group_by(Job.status))).all())
            typical = await typical_duration(session, "imagine")
        now = utcnow()
        live = [{"id": row.id, "host": row.host, "pid": row.pid, "device": row.device, "models": list(row.models),
                 "current_job": row.current_job_id, "memory_mb": row.memory_mb,
                 "heartbeat_s_ago": round((now - row.heartbeat_at).total_seconds(), 1),
                 "up_s": round((now - row.started_at).total_seconds())} for row in rows]
        queued, running = counts.get("queued", 0), counts.get("running", 0)
        return {"workers": live, "queued": queued, "running": running,
                "eta_s": round(queued * typical / max(1, len(live)), 1) if live else None}

    @uninterrupted
    async def metrics_snapshot(self) -> dict[str, Any]:
        """What /metrics reports from the database: jobs by kind and status, the queue, live workers, cache hits."""
        async with self.db.session() as session:
            rows = (await session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))).all()
            live = len(await workers.alive(session))
            hits = await session.scalar(select(func.count()).select_from(Job).where(Job.cached_from_job_id.is_not(None)))
        jobs = {(kind, status): count for kind, status, count in rows}
        return {"jobs": jobs, "queued": sum(c for (_, status), c in jobs.items() if status == "queued"),
                "workers": live, "cache_hits": hits or 0}

    async def healthy(self) -> bool:
        """Whether the database answers a trivial query (within 5 s)."""
        try:
            async with asyncio.timeout(5):
                async with self.db.reading() as connection:
                    return await connection.scalar(select(1)) == 1
        except Exception:  # any failure is "unhealthy": the health check says so, it does not crash
            log.warning("health check: the database did not answer", exc_info=True)
            return False

    async def close(self) -> None:
        """Release the database connections (after the progress events still waiting to be relayed)."""
        await self.events.close()
        await self.db.close()

    # -- what is installed ----------------------------------------------------------------------------

    def check_prompt(self, text: str, *, owner: bool = False, guild_id: str | None = None) -> None:
        """Check a prompt's syntax, model and LoRAs without queueing it (no database): front doors answer at once."""
        self.route(text, owner=owner, guild_id=guild_id)

    async def prepare_routing(self) -> None:
        """Load what routing needs ahead of the first prompt (front doors call it as they start)."""
        await asyncio.to_thread(prepare_routing, self.registry)

    def refresh_registry(self) -> None:
        """Hot reload: read models.toml again when it changed on disk (a broken file keeps the last good one)."""
        try:
            mtime = Path(self.settings.registry).stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._registry_mtime:
            self._registry_mtime = mtime
            try:
                self.registry = load_registry(self.settings.registry)
            except DreamloomError as error:
                log.error("models.toml changed but is invalid; keeping the previous registry: %s", error)

    def catalog(self) -> dict[str, list[dict[str, Any]]]:
        """The installed models and LoRAs with their descriptions, tags and trigger words."""
        models = [{"name": spec.name, "family": spec.family, "description": spec.description, "tags": list(spec.tags),
                   "default": spec.name == self.registry.default} for spec in self.registry.models.values()]
        loras = [{"name": spec.name, "family": spec.family, "description": spec.description, "tags": list(spec.tags),
                  "triggers": list(spec.triggers), "weight": spec.weight}
                 for spec in getattr(self.registry, "loras", {}).values()]
        # Active house styles too, tagged `learned`: applied by rule (--stylize, --style raw), never named in a
        # prompt. Members' personal styles stay private.
        for (kind, _, _), row in sorted(self._active_styles.items(), key=lambda item: item[1].name):
            if kind == "house" and row.name in self.learned_loras:
                loras.append({"name": row.name, "family": self.learned_loras[row.name].family,
                              "description": f"the learned house style of {row.base_model}, version {row.version} "
                                             "(applied by --stylize; off with --style raw)",
                              "tags": ["learned"], "triggers": [], "weight": row.weight})
        return {"models": models, "loras": loras}

    # -- submitting ------------------------------------------------------------------------------

    @uninterrupted
    async def _enqueue(self, new: queue.NewJob, rules: GuildSettings | None = None) -> JobView:
        limit, quota = self.settings.max_queued_per_user, self.settings.daily_quota
        if rules is not None:
            limit = rules.max_queued_per_user or limit
            quota = rules.daily_quota or quota
        new = dataclasses.replace(new, result_key=await self._result_key(new))
        async with self.db.session() as session:
            job = await queue.enqueue(session, new, max_queued_per_user=limit, daily_quota=quota)
            cached = await self._cached_result(session, new.result_key)
            if cached is not None:
                await queue.complete_from_cache(session, job, *cached)
            view = await job_view(session, self.store, job)
        if cached is not None:
            self.events.publish(ProgressEvent(view.id, "done"))
            log.info("job %s done from the result cache (job %s's pictures): %s by %s", view.id, cached[0].id,
                     new.kind, new.user_id)
            return view
        self.events.publish(ProgressEvent(view.id, "queued"))
        log.info("job %s queued: %s by %s on %s (position %s)", view.id, new.kind, new.user_id, new.model, view.position)
        return view

    async def _result_key(self, new: queue.NewJob) -> str | None:
        """What determines the new job's pictures (studio/result_cache.py); None when it cannot be cached."""
        source_sha256 = None
        if new.parent_image_id is not None:
            async with self.db.session() as session:
                source_sha256 = await session.scalar(select(Image.sha256).where(Image.id == new.parent_image_id))
        # Hashing a large checkpoint the first time takes seconds; the hashes are cached by path, size and mtime.
        return await asyncio.to_thread(
            result_key, kind=new.kind, model=new.model, loras=list(new.loras), parameters=dict(new.parameters),
            seed=new.seed, prompt=new.prompt, negative_prompt=new.negative_prompt, source_sha256=source_sha256,
            registry=self.runtime_registry(), hashes=self.file_hashes)

    async def _cached_result(self, session, key: str | None):
        """(the job that made these pictures, its images) when the result cache has them and their files are still
        in the store; else None."""
        if key is None or not self.settings.result_cache:
            return None
        found = await queue.cached_result(session, key)
        if found is None or not all(self.store.path(image.path).is_file() for image in found[1]):
            return None
        return found

    @uninterrupted
    async def submit_imagine(self, user_id: str, text: str, *, kind: str = "imagine", guild_id: str | None = None,
                             channel_id: str | None = None, image_prompt: bytes | None = None,
                             age_restricted_channel: bool | None = None, owner: bool = False) -> JobView:
        """Check a prompt (syntax, model, the server's rules) and queue it; the seed is fixed now so a rerun
        makes the same images.

        `owner` is the machine's owner at the local CLI, who may name a model by its path; everyone else names
        registered models.

        The user's default parameters (/settings) apply where the prompt does not name them. `image_prompt` is an
        uploaded image (checked and stored now). On a server, banned words are refused and a model tagged `nsfw`
        needs `age_restricted_channel` (and a server policy that allows it).
        """
        rules = await self.guilds.settings(guild_id) if guild_id else None
        if rules:
            rules.check_prompt(text)
        async with self.db.session() as session:
            user = await queue.ensure_user(session, user_id)
            defaults = dict(user.defaults)
        # What the member chose in this prompt (not through their /settings defaults) can teach the router.
        own = parse_prompt(text)
        chosen = {"text": own.prompt, "targets": self._explicit_targets(own)} if self.settings.route_learning else {}
        text = apply_defaults(text, defaults)
        await self.refresh_route_examples(guild_id)
        decision = self.route(text, owner=owner, guild_id=guild_id)
        prompt, spec = decision.prompt, decision.spec
        learned, learned_reason = await self.learned_choices(prompt, spec, user_id)
        # A model from a path is kept as its path: the worker must not look its folder name up in the registry.
        model = spec.name if self.registry.models.get(spec.name) is spec else str(spec.path)
        check_image_weight(prompt, image_prompt is not None)
        if rules:
            rules.check_model(spec.name, spec.tags, age_restricted_channel)
        parameters = prompt.to_dict()
        if chosen.get("targets"):
            parameters["chosen"] = chosen
        if model != spec.name:
            parameters["model_from_path"] = True  # the owner's: the worker loads a path for this job alone
        if image_prompt is not None:
            parameters["image_prompt"] = await asyncio.to_thread(self._store_image_prompt, image_prompt)
        seed = prompt.seed if prompt.seed is not None else self._rng.randrange(0, 2**32 - prompt.n)
        return await self._enqueue(queue.NewJob(
            kind=kind, user_id=user_id, raw_prompt=text, prompt=prompt.prompt, negative_prompt=prompt.negative_prompt,
            parameters=parameters, model=model, seed=seed, guild_id=guild_id, channel_id=channel_id,
            max_attempts=self.settings.max_attempts,
            loras=decision.to_dict()["loras"] + [{"name": choice.name, "weight": choice.weight} for choice in learned],
            route_reason="; ".join(filter(None, [decision.reason_text, learned_reason])),
        ), rules)

    @uninterrupted
    async def submit_compare(self, user_id: str, text: str, x: str, y: str | None = None, *,
                             merge_with: str | None = None, guild_id: str | None = None,
                             channel_id: str | None = None, age_restricted_channel: bool | None = None) -> JobView:
        """Queue an X/Y comparison grid (an admin's `/admin compare`): axes and every model and LoRA in them are
        checked now; the grid is one image, kept out of the gallery, exports and learning."""
        rules = await self.guilds.settings(guild_id) if guild_id else None
        if rules:
            rules.check_prompt(text)
        prompt = parse_prompt(text)
        x_axis, y_axis = parse_axes(x, y)
        recipe = None
        if merge_with:
            recipe = MergeRecipe(a=self.registry.resolve(prompt.model, allow_paths=False).name,
                                 b=self.registry.resolve(merge_with, allow_paths=False).name)
        request = CompareRequest(prompt, x_axis, y_axis, recipe)
        request.check()
        for _, _, cell, _ in compare_cells(request):  # only registered names, each allowed on this server
            spec = self.registry.resolve(cell.model, allow_paths=False)
            if rules:
                rules.check_model(spec.name, spec.tags, age_restricted_channel)
            for choice in cell.loras:
                self.registry.lora(choice.name)
        parameters = {"x": x_axis.to_text(), "y": y_axis.to_text() if y_axis else None, "merge_with": merge_with,
                      **prompt.to_dict()}
        return await self._enqueue(queue.NewJob(
            kind="compare", user_id=user_id, raw_prompt=text, prompt=prompt.prompt,
            negative_prompt=prompt.negative_prompt, parameters=parameters,
            model=self.registry.resolve(prompt.model, allow_paths=False).name,
            seed=prompt.seed if prompt.seed is not None else 1, guild_id=guild_id, channel_id=channel_id,
            loras=[{"name": choice.name, "weight": choice.weight} for choice in prompt.loras],
            max_attempts=self.settings.max_attempts, route_reason="a comparison grid"), rules)

    @uninterrupted
    async def publish_result(self, user_id: str, kind: str, raw_prompt: str, result, *, started_at: datetime,
                             source_sha256: str | None = None, mode: str | None = None) -> JobView:
        """Keep a result the owner made at the command line (`dreamloom imagine --publish`) as a finished job, so
        it joins the gallery like a queued one. A source image already in the store becomes the parent (lineage)."""
        settings = result.settings.to_dict()
        parameters = parse_prompt(raw_prompt, allow_empty=True).to_dict() | ({"mode": mode} if mode else {})
        async with self.db.session() as session:
            parent = None
            if source_sha256:
                parent = await session.scalar(select(Image.id).where(Image.sha256 == source_sha256).limit(1))
            loras = [{"name": lora.name, "weight": lora.weight} for lora in result.settings.loras]
            new = queue.NewJob(kind=kind, user_id=user_id, raw_prompt=raw_prompt, prompt=result.settings.prompt,
                               negative_prompt=result.settings.negative_prompt, parameters=parameters,
                               model=result.settings.model, loras=loras, parent_image_id=parent,
                               route_reason="made at the command line")
            job = await queue.record_finished(session, new, settings, started_at)
            images = await asyncio.to_thread(self.store_result, job.id, raw_prompt, result, parent)
            queue.add_images(session, job.id, images, job.finished_at)
            await session.flush()
            view = await job_view(session, self.store, job)
        log.info("job %s published from the command line by %s (%s, %d image(s))", view.id, user_id, kind,
                 len(view.images))
        return view

    def store_result(self, job_id: int, raw_prompt: str, result, parent_image_id: int | None) -> list[queue.NewImage]:
        """Write a job's images to the store (fsynced, each PNG naming its job and parameters) before the transaction
        that refers to them commits; returns what the rows need. Blocking: call it in a thread."""
        stored = []
        pngs = image_pngs(result, raw_prompt, job_id=job_id)
        for index, (image, seed, data) in enumerate(zip(result.images, result.seeds, pngs), start=1):
            file = self.store.put(data)
            stored.append(queue.NewImage(index, seed, image.width, image.height, file.sha256, file.path,
                                         parent_image_id=parent_image_id))
        return stored

    def _store_image_prompt(self, data: bytes) -> str:
        """Check an uploaded image (size, format, decompression bombs) and store it as PNG; returns its path."""
        image = open_image(data)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self.store.put(buffer.getvalue()).path

    @uninterrupted
    async def submit_from_image(self, user_id: str, image_id: int, kind: str, mode: str, *,
                                age_restricted_channel: bool | None = None) -> JobView:
        """Queue an upscale (`mode` detail/creative) or variations (`mode` subtle/strong) of a stored image."""
        modes = {"upscale": ("detail", "creative"), "vary": ("subtle", "strong")}
        if kind not in modes or mode not in modes[kind]:
            raise InvalidRequest(f"{kind} takes one of {', '.join(modes.get(kind, ()))}; got {mode!r}.")
        async with self.db.session() as session:
            image = await session.get(Image, image_id)
            if image is None:
                raise NotFound(f"There is no image {image_id}.")
            source = await session.get(Job, image.job_id)
        rules = await self.guilds.settings(source.guild_id) if source.guild_id else None
        spec = self.registry.models.get(source.model or "")
        if rules and spec:
            rules.check_model(spec.name, spec.tags, age_restricted_channel)
        parameters = {k: v for k, v in source.parameters.items() if k != "image_prompt"} | {"mode": mode}
        seed = image.seed if kind == "upscale" else self._rng.randrange(0, 2**32 - 4)
        return await self._enqueue(queue.NewJob(
            kind=kind, user_id=user_id, raw_prompt=source.raw_prompt, prompt=source.prompt,
            negative_prompt=source.negative_prompt, parameters=parameters, model=source.model, seed=seed,
            guild_id=source.guild_id, channel_id=source.channel_id, parent_image_id=image_id, loras=list(source.loras or []),
            max_attempts=self.settings.max_attempts, route_reason=f"same model and LoRAs as image {image_id}",
        ), rules)

    @uninterrupted
    async def submit_reroll(self, user_id: str, job_id: int, *, age_restricted_channel: bool | None = None) -> JobView:
        """The same prompt again with new seeds."""
        async with self.db.session() as session:
            source = await find_job(session, job_id)
        image_prompt = source.parameters.get("image_prompt")
        return await self.submit_imagine(user_id, _without_seed(source.raw_prompt), kind="reroll",
                                         guild_id=source.guild_id, channel_id=source.channel_id,
                                         image_prompt=self.store.read(image_prompt) if image_prompt else None,
                                         age_restricted_channel=age_restricted_channel)

    @uninterrupted
    async def cancel(self, job_id: int, user_id: str | None) -> JobView:
        """Cancel a queued job, or ask a running one to stop (owner only; `user_id=None` for admins)."""
        async with self.db.session() as session:
            job = await queue.cancel(session, job_id, user_id)
            view = await job_view(session, self.store, job)
        if view.status == "cancelled":
            self.events.publish(ProgressEvent(job_id, "cancelled", message="Cancelled."))
        elif view.status == "running" and job_id in self.running_jobs:
            self.running_jobs[job_id].set()  # running here: stop now (other processes poll the flag)
        log.info("job %s: cancel asked by %s (%s)", job_id, user_id or "an admin", view.status)
        return view

    @uninterrupted
    async def attach_message(self, job_id: int, channel_id: str, message_id: str) -> None:
        """Remember the chat message that shows a job, so reactions and buttons on it find the job later."""
        async with self.db.session() as session:
            job = await find_job(session, job_id)
            job.channel_id, job.message_id = channel_id, message_id

    @uninterrupted
    async def job_for_message(self, message_id: str) -> JobView | None:
        """The job a chat message shows, if any."""
        async with self.db.session() as session:
            job = await session.scalar(select(Job).where(Job.message_id == message_id).order_by(Job.id.desc()).limit(1))
            return await job_view(session, self.store, job, with_position=False) if job else None

    # -- servers, members and the registry (admin) --------------------------------------------------

    @uninterrupted
    async def set_banned(self, user_id: str, banned: bool, *, purge_votes: bool = False) -> int:
        """Ban or unban a member: a banned member cannot queue jobs or vote, is signed out of the web, and the
        gallery hides their images. `purge_votes` also removes their votes (counts recomputed); returns how many."""
        async with self.db.session() as session:
            user = await queue.ensure_user(session, user_id)
            user.banned = banned
            removed = 0
            if banned:
                await sessions.end_sessions_of(session, user_id)
                if purge_votes:
                    removed = await votes.purge_votes(session, user_id)
        log.info("%s %s%s", user_id, "banned" if banned else "unbanned", f"; {removed} vote(s) removed" if removed else "")
        return removed

    def reload_registry(self) -> Registry:
        """Read models.toml again (an admin command); a broken file keeps the old registry and raises ConfigError."""
        self.registry = load_registry(self.settings.registry)
        self._registry_mtime = Path(self.settings.registry).stat().st_mtime_ns
        return self.registry

    # -- reading ----------------------------------------------------------------------------------

    @uninterrupted
    async def job(self, job_id: int) -> JobView:
        """A job with its queue position, ETA and images."""
        async with self.db.session() as session:
            job = await find_job(session, job_id)
            return await job_view(session, self.store, job)

    @uninterrupted
    async def jobs(self, user_id: str | None = None, status: str | None = None, limit: int = 20) -> list[JobView]:
        """Newest jobs first, optionally of one user or status."""
        statement = select(Job).order_by(Job.id.desc()).limit(max(1, min(limit, 500)))
        if user_id:
            statement = statement.where(Job.user_id == user_id)
        if status:
            statement = statement.where(Job.status == status)
        async with self.db.session() as session:
            return [await job_view(session, self.store, job, with_position=False) for job in (await session.scalars(statement)).all()]

    @uninterrupted
    async def export(self, folder: Path, fmt: str, filters: ExportFilter,
                     kohya: KohyaLayout = KohyaLayout()) -> ExportReport:
        """Export the best images as a fine-tuning dataset (`kohya` names the kohya format's folder)."""
        async with self.db.session() as session:
            return await export_dataset(session, self.store, folder, fmt, filters, kohya)

def _without_seed(text: str) -> str:
    """The raw prompt with any --seed removed (a reroll gets new seeds)."""
    return re.sub(r"(?:(?<=\s)|^)(?:--|\u2014)seed\s+\S+", "", text).strip()
