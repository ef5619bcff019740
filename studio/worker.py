"""The worker: claims jobs from the queue, runs them on the engine, stores their images; and `serve`."""
from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import io
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import select

from dreamloom.errors import UnknownModel, DreamloomError, public_message, EngineUnavailable, GenerationCancelled, NotAllowed
from engine.generation import GenerationResult, ImagineRequest, UpscaleRequest, VaryRequest
from engine.compare import CompareRequest, parse_axes
from engine.images import open_image
from engine.recipe import MergeRecipe
from engine.params import LoraChoice, parse_prompt
from storage import queue, workers
from storage.database import uninterrupted
from storage.models import Image, Job
from studio.events import ProgressEvent
from studio.service import Studio

log = logging.getLogger(__name__)
PREVIEW_INTERVAL_S = 0.5
CANCEL_POLL_S = 0.5  # a cancel from another process is seen within this time


class Worker:
    """Runs queued jobs one at a time on the engine; many workers may share a PostgreSQL database."""

    def __init__(self, studio: Studio, engine, worker_id: str) -> None:
        self.studio = studio
        self.engine = engine
        self.worker_id = worker_id
        self.lease_seconds = studio.settings.lease_seconds
        self.interrupt = threading.Event()  # set on a second shutdown signal: stop the running job
        self.stop: asyncio.Event | None = None  # set on the first: a learning job pauses at its next checkpoint
        self.current_job: int | None = None
        self._next_sweep = 0.0  # time.monotonic() of the next look for expired leases
        studio.metrics.engine = engine  # /metrics reads its model loads and embedding cache

    async def run(self, stop: asyncio.Event, idle_seconds: float = 0.5) -> None:
        """Claim and run jobs until `stop` is set; the running job is finished first (a learning job is paused
        at its next checkpoint and resumes from it later)."""
        self.stop = stop
        while not stop.is_set():
            if not await self.run_one():
                try:
                    await asyncio.wait_for(stop.wait(), idle_seconds)
                except asyncio.TimeoutError:
                    pass

    async def keep_beating(self, stop: asyncio.Event, interval: float = workers.HEARTBEAT_S) -> None:
        """Write this worker's heartbeat (the models it holds, its job, device and memory) until `stop`; then leave
        the list of live workers."""
        while True:
            try:
                await self._beat()
            except Exception:  # a database hiccup must not stop the worker; the next beat tries again
                log.warning("heartbeat not written", exc_info=True)
            if await _wait(stop, interval):
                break
        try:
            await self._leave()
        except Exception:
            log.warning("could not remove this worker's heartbeat", exc_info=True)

    @uninterrupted
    async def _beat(self) -> None:
        beat = workers.Heartbeat(self.worker_id, socket.gethostname(), os.getpid(), self.engine.device,
                                 self.engine.cache.loaded_names(), self.current_job, self.engine.memory_mb())
        async with self.studio.db.session() as session:
            await workers.beat(session, beat)

    @uninterrupted
    async def _leave(self) -> None:
        async with self.studio.db.session() as session:
            await workers.gone(session, self.worker_id)

    async def run_one(self, exclude_kinds: tuple[str, ...] = ()) -> bool:
        """Run the next job (none of `exclude_kinds`); False when the queue was empty."""
        job = await self._claim(exclude_kinds)
        if job is None:
            return False
        previous, self.current_job = self.current_job, job.id
        cancel = threading.Event()
        finished = asyncio.Event()  # stops the heartbeat and the watcher between two queries, never inside one
        heartbeat = asyncio.create_task(self._heartbeat(job.id, cancel, finished))
        watcher = asyncio.create_task(self._watch_cancel(job.id, cancel, finished))
        self.studio.running_jobs[job.id] = cancel  # a cancel in this process stops the job at once
        self.studio.events.publish(ProgressEvent(job.id, "started"))
        waited = (job.started_at - job.created_at).total_seconds() if job.started_at and job.created_at else 0.0
        log.info("job %s started: %s by %s on %s (waited %.1f s, attempt %s)", job.id, job.kind, job.user_id, job.model,
                 waited, job.attempts)
        started = time.monotonic()
        try:
            if job.kind == "learn":
                await self._learn(job, cancel)
                return True
            result = await self._generate(job, cancel)
            images = await asyncio.to_thread(self.studio.store_result, job.id, job.raw_prompt, result,
                                             job.parent_image_id)
            completed = await self._complete(job.id, images, result.settings.to_dict())
            if completed:
                self.studio.metrics.observe_job(job.kind, waited, time.monotonic() - started)
                self.studio.events.publish(ProgressEvent(job.id, "done"))
                timings = ", ".join(f"{key[:-2]} {value:.2f} s" for key, value in result.timings.items())
                log.info("job %s done: %d image(s) %dx%d in %.2f s (%s)", job.id, len(result.images),
                         result.settings.width, result.settings.height, time.monotonic() - started, timings)
            else:
                log.warning("job %s finished after its lease was lost; its result was dropped", job.id)
        except LearningPaused as paused:
            await self._release(job.id, str(paused))
        except GenerationCancelled:
            requeue = self.interrupt.is_set()
            message = "Interrupted by a shutdown; it will run again." if requeue else "Cancelled while it ran."
            await self._end(job.id, message, retry=requeue, cancelled=not requeue)
        except EngineUnavailable as error:
            await self._end(job.id, str(error), retry=True)
        except DreamloomError as error:
            await self._end(job.id, str(error), retry=False)
        except Exception:
            log.exception("job %s failed", job.id)
            await self._end(job.id, "Internal error while generating; it will be retried.", retry=True)
        finally:
            # Cancelling a task in the middle of a database call can leave its connection holding SQLite's lock;
            # these two stop at their next wait instead (one query at most).
            finished.set()
            await asyncio.gather(heartbeat, watcher, return_exceptions=True)
            self.studio.running_jobs.pop(job.id, None)
            self.current_job = previous
        return True

    # Database work runs @uninterrupted: a shutdown that cancels the worker never cuts a session in half.

    @uninterrupted
    async def _claim(self, exclude_kinds: tuple[str, ...] = ()) -> Job | None:
        async with self.studio.db.session() as session:
            # A job whose worker died (SIGKILL, a lost machine) keeps its lease until it expires; whichever worker
            # claims next puts it back in the queue, so no process has to watch the others. A quarter of a lease
            # between looks keeps an idle worker's polls to one query, and a dead job waits at most 1.25 leases.
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.lease_seconds / 4
                requeued = await queue.requeue_orphans(session, lock=not self.studio.db.is_sqlite)
                if requeued:
                    log.warning("job(s) %s queued again: their worker stopped renewing the lease",
                                ", ".join(map(str, requeued)))
            return await queue.claim(session, self.worker_id, self.lease_seconds, lock=not self.studio.db.is_sqlite,
                                     exclude_kinds=exclude_kinds, loaded_models=tuple(self.engine.cache.loaded_names()))

    @uninterrupted
    async def _release(self, job_id: int, note: str) -> None:
        async with self.studio.db.session() as session:
            released = await queue.release(session, job_id, self.worker_id, note)
        log.info("job %s %s: %s", job_id, "paused" if released else "ended elsewhere", note)

    @uninterrupted
    async def _record_progress(self, job_id: int, progress: dict) -> None:
        async with self.studio.db.session() as session:
            await queue.record_progress(session, job_id, self.worker_id, progress)

    @uninterrupted
    async def _complete(self, job_id: int, images: list[queue.NewImage], settings: dict) -> bool:
        async with self.studio.db.session() as session:
            return await queue.complete(session, job_id, self.worker_id, images, settings)

    @uninterrupted
    async def _end(self, job_id: int, message: str, *, retry: bool, cancelled: bool = False) -> None:
        """Record how a job ended. Members see the message with server paths hidden (in Discord and on the job page);
        the log keeps it whole for the owner."""
        shown = public_message(message)
        async with self.studio.db.session() as session:
            status = await queue.fail(session, job_id, self.worker_id, shown, retry=retry, cancelled=cancelled)
        if status in ("failed", "cancelled"):
            self.studio.events.publish(ProgressEvent(job_id, status, message=shown))
        log.info("job %s %s: %s", job_id, {"queued": "queued again", None: "ended elsewhere"}.get(status, status), message)

    async def _watch_cancel(self, job_id: int, cancel: threading.Event, finished: asyncio.Event) -> None:
        """Poll the job's cancel flag, so a cancel from any process (the CLI, the web, Discord, another `serve`)
        stops the job at its next step, not only at the next lease renewal."""
        while not cancel.is_set() and not await _wait(finished, CANCEL_POLL_S):
            if await self._cancel_requested(job_id):
                cancel.set()

    @uninterrupted
    async def _cancel_requested(self, job_id: int) -> bool:
        async with self.studio.db.reading() as connection:
            return bool(await connection.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    async def _heartbeat(self, job_id: int, cancel: threading.Event, finished: asyncio.Event) -> None:
        """Renew the lease while the job runs; a cancel request or a lost lease stops the job."""
        while not await _wait(finished, self.lease_seconds / 3):
            if not await self._renew(job_id):
                cancel.set()

    @uninterrupted
    async def _renew(self, job_id: int) -> bool:
        """Extend the lease; False when it was lost or a cancel was asked for."""
        async with self.studio.db.session() as session:
            alive = await queue.renew_lease(session, job_id, self.worker_id, self.lease_seconds)
            job = await session.get(Job, job_id, populate_existing=True)
            return alive and not job.cancel_requested

    async def _learn(self, job: Job, cancel: threading.Event) -> None:
        """A learning job: train in bounded slices on the engine's thread (the one GPU lock), checkpoint after each
        slice and let waiting generations run before the next, so members still get their grids; then evaluate,
        keep the version (active if it beats the base) and finish the job. A restart resumes from the checkpoint."""
        loop = asyncio.get_running_loop()
        parameters = job.parameters or {}
        plan = await self.studio.plan_learning(job.model, voter=parameters.get("voter"),
                                               objective=parameters.get("objective", "kto"), steps=parameters.get("steps"))
        checkpoint = self.studio.learning_checkpoint(job.id)
        trainer = await self.engine.call_async(self.studio.start_training, plan, self.engine.device)
        if await self.engine.call_async(trainer.resume, checkpoint):
            log.info("job %s: learning resumes at step %d of %d", job.id, trainer.step, trainer.steps)

        def on_step(progress) -> None:
            if self.interrupt.is_set():
                cancel.set()
            loop.call_soon_threadsafe(self.studio.events.publish, ProgressEvent(
                job.id, "step", progress.step, progress.steps, message=f"loss {progress.loss:.4f}"))

        def progress() -> dict:
            return {"step": trainer.step, "steps": trainer.steps, "loss": round(trainer.losses[-1], 6) if trainer.losses
                    else None, "elapsed_s": round(time.time() - trainer.started, 1), "style": plan.name}

        try:
            while not trainer.done:
                await self.engine.call_async(trainer.train, max_seconds=self.studio.settings.learn_slice_seconds,
                                             cancel=cancel, on_step=on_step)
                await self.engine.call_async(trainer.checkpoint, checkpoint)
                await self._record_progress(job.id, progress())
                if trainer.done:
                    break
                if self.stop is not None and self.stop.is_set():
                    raise LearningPaused(f"Paused at step {trainer.step} of {trainer.steps} by a shutdown; it "
                                         "resumes from there.")
                await self._generations_between_slices()
            evaluation = await self.engine.call_async(self.studio.finish_training, plan, trainer)
        except GenerationCancelled:
            if not self.interrupt.is_set():
                checkpoint.unlink(missing_ok=True)  # cancelled for good; an interrupted one resumes
            raise
        done = progress()
        trainer = None  # let the training copy of the base model go
        view = await self.studio.register_learned(plan, evaluation)
        settings = {"model": plan.spec.name, "style": view.to_dict(), "summary": view.summary(), "progress": done,
                    "before_after": (plan.folder / "before-after.png").relative_to(self.studio.settings.data_dir).as_posix()}
        if await self._complete(job.id, [], settings):
            self.studio.events.publish(ProgressEvent(job.id, "done"))
            log.info("job %s done: %s", job.id, view.summary())
        checkpoint.unlink(missing_ok=True)

    async def _generations_between_slices(self) -> None:
        """Run waiting generations for up to one slice's time (all of them when the queue is short): under load
        members and the learning job share the GPU about half and half, and an idle queue costs training nothing."""
        budget = self.studio.settings.learn_slice_seconds
        started = time.monotonic()
        while time.monotonic() - started < budget and not (self.stop is not None and self.stop.is_set()):
            if not await self.run_one(exclude_kinds=("learn",)):
                return

    async def _generate(self, job: Job, cancel: threading.Event) -> GenerationResult:
        loop = asyncio.get_running_loop()
        last_preview = [0.0, PREVIEW_INTERVAL_S]  # when, and the interval to the next one

        def on_step(progress) -> None:
            if self.interrupt.is_set():
                cancel.set()
            preview_png = None
            now = time.monotonic()
            if now - last_preview[0] >= last_preview[1] or progress.step == progress.total:
                image = progress.preview()
                # A preview decoded by a VAE costs time on a CPU: keep previews under 5% of the job.
                last_preview[:] = [time.monotonic(), max(PREVIEW_INTERVAL_S, 20 * (time.monotonic() - now))]
                if image is not None:
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    preview_png = buffer.getvalue()
            loop.call_soon_threadsafe(self.studio.events.publish,
                                      ProgressEvent(job.id, "step", progress.step, progress.total, preview_png))

        prompt = parse_prompt(job.raw_prompt, allow_empty=job.kind in ("upscale", "vary"))
        loras = tuple(LoraChoice(lora["name"], lora["weight"]) for lora in job.loras or [])
        prompt = dataclasses.replace(prompt, seed=job.seed, model=job.model, loras=loras)
        self.studio.refresh_registry()
        self.engine.registry = self.studio.runtime_registry()  # models.toml (admins may edit it) and learned styles
        if job.model and job.model not in self.studio.registry.models and not job.parameters.get("model_from_path"):
            # Only the owner's CLI jobs name a model by path; a member's job names a registered model.
            raise UnknownModel(f"Model {job.model!r} is no longer registered; choose another with --model.")
        mode = job.parameters.get("mode")
        if job.kind == "compare":
            parameters = job.parameters
            recipe = MergeRecipe(a=prompt.model, b=parameters["merge_with"]) if parameters.get("merge_with") else None
            request = CompareRequest(prompt, *parse_axes(parameters["x"], parameters.get("y")), recipe)
            return await self.engine.compare_async(request, on_step, cancel)
        if job.kind in ("imagine", "reroll"):
            image_prompt = job.parameters.get("image_prompt")
            init_image = open_image(self.studio.store.read(image_prompt)) if image_prompt else None
            return await self.engine.imagine_async(ImagineRequest(prompt, init_image, route=False), on_step, cancel)
        source = await self._source_image(job.parent_image_id)
        if job.kind == "vary":
            return await self.engine.vary_async(VaryRequest(source, dataclasses.replace(prompt, n=4), mode, route=False),
                                                on_step, cancel)
        return await self.engine.upscale_async(UpscaleRequest(source, prompt, mode, route=False), on_step, cancel)

    @uninterrupted
    async def _source_image(self, image_id: int | None):
        async with self.studio.db.session() as session:
            image = await session.get(Image, image_id) if image_id is not None else None
        if image is None:
            raise DreamloomError("The source image of this job no longer exists.")
        return open_image(self.studio.store.read(image.path))


SCHEDULE_CHECK_S = 600.0  # how often `learn_every` looks for models whose house style is due


async def learn_on_schedule(studio: Studio, stop: asyncio.Event, check_seconds: float = SCHEDULE_CHECK_S) -> None:
    """Queue a house-style learning job for each base model that `learn_every` says is due, until `stop`."""
    while not stop.is_set():
        try:
            for model in await studio.due_house_styles():
                job = await studio.submit_learn("system:schedule", model)
                log.info("scheduled learning of the house style of %s: job %s", model, job.id)
        except DreamloomError as error:  # too few ratings yet: the next check tries again
            log.info("scheduled learning skipped: %s", error)
        except Exception:
            log.exception("scheduled learning check failed")
        await _wait(stop, check_seconds)


class LearningPaused(Exception):
    """A learning job stopped at a checkpoint by a shutdown: back to the queue, not counted as an attempt."""


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` was set within `seconds`."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _lock_data_dir(data_dir: Path):
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "serve.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise NotAllowed(f"Another `dreamloom serve` is already running on {data_dir}.") from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


async def serve(settings, *, announce=print, front_doors=(), work: bool = True, recover: bool = True) -> None:
    """Run the studio service until SIGTERM/SIGINT: recover, start the front doors, work through the queue.

    Each front door is `async start(studio, settings) -> cleanup coroutine function`, e.g. the web gallery.
    `work=False` runs the front doors only (`serve --no-worker`: GPU workers elsewhere take the jobs);
    `recover=False` is a `dreamloom worker` beside others: it neither sweeps the image store nor requeues jobs by
    host (a dead worker's job comes back when its lease runs out) and takes no data-directory lock.
    """
    lock = _lock_data_dir(Path(settings.data_dir)) if recover else None
    studio = await Studio.open(settings)
    host = socket.gethostname()
    worker_id = f"{host}:{os.getpid()}:{int(time.time())}"
    requeued, report = [], None
    try:
        if recover:
            requeued, report = await _recover(studio, host)
        if work and not front_doors and settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.metrics_port, registry=studio.metrics.registry)
            announce(f"dreamloom worker: metrics on port {settings.metrics_port}")
        # 2. The engine (torch is imported only here: `serve --no-worker` never loads it), and signals: the first
        #    stops claiming, the second interrupts the running job.
        budget = settings.model_memory_budget_mb * 2**20 if settings.model_memory_budget_mb else None
        if work:
            from engine.service import Engine
        engine = Engine(studio.registry, settings.cache_dir, device=settings.device, memory_budget_bytes=budget,
                        embedding_cache_size=settings.embedding_cache_size, threads=settings.torch_threads) if work else None
        worker = Worker(studio, engine, worker_id) if work else None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set() and worker is not None:
                worker.interrupt.set()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if front_doors:  # on PostgreSQL, progress from workers in other processes reaches these front doors at once
            await studio.events.listen()
        cleanups = [await start(studio, settings, announce) for start in front_doors]
        schedule = asyncio.create_task(learn_on_schedule(studio, stop)) if settings.learn_interval and recover else None
        role = f"worker {worker_id}" if work else "front doors only, no worker"
        recovered = (f"; {len(requeued)} interrupted job(s) queued again, {len(report.orphans_removed)} stray file(s) "
                     "removed") if report is not None else ""
        announce(f"dreamloom serve: ready on {studio.db.safe_url} ({role}{recovered})")
        # 3. Work until told to stop.
        if worker is not None:
            heartbeat = asyncio.create_task(worker.keep_beating(stop))
            await worker.run(stop)
            await heartbeat
        else:
            await stop.wait()
        if schedule is not None:
            await asyncio.gather(schedule, return_exceptions=True)
        for cleanup in cleanups:
            await cleanup()
        if engine is not None:
            engine.close()
        announce("dreamloom serve: stopped")
    finally:
        await studio.close()
        if lock is not None:
            lock.close()


async def _recover(studio: Studio, host: str):
    """Jobs a dead worker of this host held go back to the queue; files without rows go away."""
    async with studio.db.session() as session:
        requeued = await queue.requeue_orphans(session, owner_prefix=f"{host}:")
        referenced = set((await session.scalars(select(Image.path))).all())
        # Uploaded image prompts of jobs still to run are files without an image row.
        waiting = await session.scalars(select(Job.parameters).where(Job.status.in_(("queued", "running"))))
        referenced |= {parameters["image_prompt"] for parameters in waiting if parameters.get("image_prompt")}
    report = await asyncio.to_thread(studio.store.sweep, referenced)
    if report.missing:
        log.error("%d image files are missing from %s", len(report.missing), studio.store.root)
    return requeued, report
