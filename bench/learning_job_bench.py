"""How long members wait for a grid while a learning job trains, against an idle worker. Prints JSON.

    .venv/bin/python bench/learning_job_bench.py [--grids 6] [--steps 120] [--slice 10]

The same grids (same prompts and seeds, one every few seconds) are queued twice: once to an idle worker (the
baseline) and once while a house style trains as a learning job in slices of `--slice` seconds. Each grid's wait
(queued to started) and latency (queued to done) are reported, and the learning job's own time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.service import Engine  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402
from studio.worker import Worker  # noqa: E402


async def grids_under(studio: Studio, worker: Worker, count: int, gap_s: float, while_learning: bool, steps: int) -> dict:
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop, idle_seconds=0.05))
    learning = None
    if while_learning:
        learning = await studio.submit_learn("cli:owner", steps=steps)
        while (await studio.job(learning.id)).status != "running":
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # well into its first slice
    queued = []
    for index in range(count):
        queued.append(await studio.submit_imagine("discord:42", f"a star at the top --seed {index} --steps 12"))
        await asyncio.sleep(gap_s)
    async def all_done() -> bool:
        return all([(await studio.job(job.id)).status == "done" for job in queued])

    while not await all_done():
        await asyncio.sleep(0.1)
    done = [await studio.job(job.id) for job in queued]
    waits = [(job.finished_at - job.created_at).total_seconds() for job in done]
    result = {"grids": count, "latency_s": {"median": round(statistics.median(waits), 2), "max": round(max(waits), 2)}}
    if learning is not None:
        while (await studio.job(learning.id)).status not in ("done", "failed", "cancelled"):
            await asyncio.sleep(0.2)
        job = await studio.job(learning.id)
        result["learning_job"] = {"status": job.status, "steps": steps,
                                  "seconds": round((job.finished_at - job.created_at).total_seconds(), 1)}
    stop.set()
    await running
    return result


async def main(args) -> dict:
    scratch = Path(tempfile.mkdtemp())
    settings = Settings(data_dir=scratch / "data", registry=ROOT / "tests" / "registry.toml", max_queued_per_user=500,
                        learn_slice_seconds=args.slice)
    studio = await Studio.open(settings)
    engine = Engine(studio.registry, scratch / "cache", device="cpu")
    worker = Worker(studio, engine, "bench:1:1")
    # A community of 8 grids rated by two members (the first two images of each liked).
    for index, shape in enumerate(["circle", "square", "triangle", "star"] * 2):
        await studio.submit_imagine("cli:maker", f"a {shape} --seed {index} --steps 8")
    while await worker.run_one():
        pass
    for job in await studio.jobs(limit=20):
        for image in job.images:
            for voter in ("discord:1", "discord:2"):
                await studio.community.vote(image.id, voter, 1 if image.index <= 2 else -1)
    started = time.perf_counter()
    baseline = await grids_under(studio, worker, args.grids, args.gap, False, args.steps)
    learning = await grids_under(studio, worker, args.grids, args.gap, True, args.steps)
    engine.close()
    await studio.close()
    return {"device": "cpu", "slice_s": args.slice, "gap_s": args.gap, "idle_worker": baseline,
            "while_learning": learning, "bench_s": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, default=6)
    parser.add_argument("--gap", type=float, default=4.0, help="seconds between two grids")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--slice", type=float, default=10.0)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
