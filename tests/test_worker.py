"""The worker on the real engine, in process and as `dreamloom serve` killed with SIGKILL."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from storage.models import Image, Job
from studio.service import Studio
from studio.settings import Settings
from studio.worker import Worker
from tests.conftest import TEST_REGISTRY
from tests.aio import run

DREAMLOOM = Path(sys.executable).parent / "dreamloom"


def test_worker_runs_imagine_vary_upscale_reroll_with_progress(engine, tmp_path):
    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY, lease_seconds=6))
        worker = Worker(studio, engine, "test:1:1")
        job = await studio.submit_imagine("alice", "a red circle on a blue background --seed 7 --steps 8")
        events = studio.events.subscribe(job.id)
        assert await worker.run_one()
        kinds = []
        while not events.empty():
            kinds.append(events.get_nowait())
        steps = [e for e in kinds if e.kind == "step"]
        assert [e.step for e in steps] == list(range(1, 9)) and steps[-1].preview_png is not None
        assert kinds[-1].kind == "done"
        done = await studio.job(job.id)
        assert done.status == "done" and [i.seed for i in done.images] == [7, 8, 9, 10]
        png = PILImage.open(done.images[0].path)
        assert "Seed: 7" in png.info["parameters"] and png.size == (64, 64)

        vary = await studio.submit_from_image("bob", done.images[0].id, "vary", "subtle")
        upscale = await studio.submit_from_image("bob", done.images[1].id, "upscale", "detail")
        reroll = await studio.submit_reroll("carol", job.id)
        for _ in range(3):
            assert await worker.run_one()
        upscaled = await studio.job(upscale.id)
        assert upscaled.status == "done" and upscaled.images[0].width == 128 and upscaled.images[0].seed == 8
        varied = await studio.job(vary.id)
        assert varied.status == "done" and len(varied.images) == 4
        rerolled = await studio.job(reroll.id)
        assert rerolled.status == "done" and rerolled.seed != 7 and "--seed" not in rerolled.raw_prompt
        lineage = await studio.showcase.lineage(done.images[0].id)
        assert {d["job_id"] for d in lineage["descendants"]} == {vary.id}
        assert not await worker.run_one()  # the queue is empty
        await studio.close()

    run(scenario())


async def _a_running_job(studio, engine, prompt: str):
    """Queue `prompt` for alice and run it on a worker until its first step: (job, its events, the worker's task)."""
    worker = Worker(studio, engine, "test:1:1")
    job = await studio.submit_imagine("alice", prompt)
    events = studio.events.subscribe(job.id)
    running = asyncio.create_task(worker.run_one())
    while (await events.get()).kind != "step":
        pass
    return job, events, running


def test_cancelling_a_running_job_stops_it(engine, tmp_path):
    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY, lease_seconds=3))
        job, _, running = await _a_running_job(studio, engine, "a red circle --steps 150 --seed 1")
        await studio.cancel(job.id, "alice")
        await asyncio.wait_for(running, 60)
        view = await studio.job(job.id)
        assert view.status == "cancelled" and view.images == []
        await studio.close()

    run(scenario())


def test_a_cancel_from_another_process_stops_the_running_job_at_its_next_step(engine, tmp_path):
    async def scenario():
        # A long lease: its renewals (every 20 s) are not what stops the job.
        studio = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY, lease_seconds=60))
        job, events, running = await _a_running_job(studio, engine, "a red circle --steps 150 --q 2 --seed 1")
        steps = [1]
        # `dreamloom cancel` in a process of its own: only the database connects it with this worker.
        env = {**os.environ, "DREAMLOOM_DATA_DIR": str(tmp_path)}
        cli = await asyncio.create_subprocess_exec(str(DREAMLOOM), "cancel", str(job.id), "--user", "alice", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        output, errors = await asyncio.wait_for(cli.communicate(), 120)
        await asyncio.wait_for(running, 60)
        while not events.empty():
            event = events.get_nowait()
            if event.kind == "step":
                steps.append(event.step)
        view = await studio.job(job.id)
        assert view.status == "cancelled" and view.images == [], (output, errors)
        assert max(steps) < 300  # stopped mid-run: 150 steps at --q 2
        assert f"job {job.id}: cancelled" in output.decode(), (output, errors)
        await studio.close()

    run(scenario())


def _jobs(data_dir: Path) -> list[dict]:
    async def read():
        studio = await Studio.open(Settings(data_dir=data_dir, registry=TEST_REGISTRY))
        try:
            async with studio.db.session() as session:
                jobs = (await session.scalars(select(Job).order_by(Job.id))).all()
                images = (await session.scalars(select(Image))).all()
            return [{"id": j.id, "status": j.status, "attempts": j.attempts, "n": j.parameters["n"],
                     "images": sorted(i.index_in_job for i in images if i.job_id == j.id)} for j in jobs]
        finally:
            await studio.close()

    return run(read())


@pytest.mark.timeout(600)  # three `serve` starts and 8 jobs: about 100 s alone, twice that beside another busy process
def test_kill_9_mid_queue_then_restart_completes_every_job_exactly_once(tmp_path):
    data = tmp_path / "data"
    env = {**os.environ, "DREAMLOOM_DATA_DIR": str(data), "DREAMLOOM_DEVICE": "cpu", "DREAMLOOM_LEASE_SECONDS": "5",
           "HF_HUB_OFFLINE": "1"}
    async def submit_all():  # in this process: eight `dreamloom submit` runs cost a Python start each
        studio = await Studio.open(Settings(data_dir=data, registry=TEST_REGISTRY, lease_seconds=5))
        for i in range(8):
            await studio.submit_imagine(f"user{i % 3}", f"a red circle --steps 40 --seed {i} --n {1 + i % 2}")
        await studio.close()

    run(submit_all())

    def start():
        return subprocess.Popen([str(DREAMLOOM), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    interrupted = None
    for _ in range(3):  # the kill must land while a job runs; retry in the rare case it did not
        server = start()
        deadline = time.time() + 180
        while time.time() < deadline:
            jobs = _jobs(data)
            if sum(j["status"] == "done" for j in jobs) >= 2 and any(j["status"] == "running" for j in jobs):
                break
            time.sleep(0.3)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        running = [j for j in _jobs(data) if j["status"] == "running"]
        if running:
            interrupted = running[0]["id"]
            break
    assert interrupted is not None, "never caught a job running"

    server = start()
    deadline = time.time() + 300
    while time.time() < deadline and not all(j["status"] == "done" for j in _jobs(data)):
        time.sleep(0.5)
    server.send_signal(signal.SIGTERM)
    output, _ = server.communicate(timeout=120)
    assert server.returncode == 0 and "interrupted job(s) queued again" in output and "stopped" in output
    # The log tells what happened to each job, one line an event, and nothing else of note.
    assert " done: " in output and " started: " in output and "waited" in output, output
    assert "%|" not in output and "Batches" not in output and "Loading" not in output, output

    jobs = _jobs(data)
    assert len(jobs) == 8 and all(j["status"] == "done" for j in jobs), jobs
    for job in jobs:
        assert job["images"] == list(range(1, job["n"] + 1)), job  # every image once, none doubled
    assert next(j for j in jobs if j["id"] == interrupted)["attempts"] >= 2
    stored = [p for p in (data / "images").rglob("*.png")]
    assert len(stored) == sum(j["n"] for j in jobs)  # no stray files, none missing


def test_a_failed_job_tells_members_what_failed_without_server_paths(engine, tmp_path):
    """A registered model whose folder is gone: the job fails with a message members can read, the folder hidden;
    and a member's job whose model was unregistered since is refused, not looked up on disk by its name."""
    async def scenario():
        missing = tmp_path / "models" / "gone-model"
        registry = tmp_path / "models.toml"
        registry.write_text(TEST_REGISTRY.read_text() + f'\n[[models]]\nname = "gone"\npath = "{missing}"\nfamily = "starter"\n')
        studio = await Studio.open(Settings(data_dir=tmp_path / "data", registry=registry))
        worker = Worker(studio, engine, "test:1:1")
        job = await studio.submit_imagine("discord:1", "a red circle --model gone --steps 2")
        assert await worker.run_one()
        failed = await studio.job(job.id)
        assert failed.status == "failed" and "gone" in failed.error and str(tmp_path) not in failed.error
        assert "(a file on the server)" in failed.error
        async with studio.db.session() as session:
            (await session.get(Job, (await studio.submit_imagine("discord:1", "a cat --steps 2")).id)).model = "starter-copy"
        assert await worker.run_one()
        refused = (await studio.jobs(limit=1))[0]
        assert refused.status == "failed" and "no longer registered" in refused.error
        await studio.close()

    run(scenario())
