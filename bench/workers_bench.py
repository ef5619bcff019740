"""Throughput with one vs two `dreamloom worker` processes on one PostgreSQL queue. Prints JSON.

    .venv/bin/python bench/workers_bench.py [--jobs 24] [--steps 8]

The same jobs (six members, distinct seeds, the starter model, result cache off) are queued with no worker running;
then 1 worker (torch on every core) or 2 workers (torch threads pinned: cores / 2 each) are started, and the time
from their start to the last job done is measured, both with the same start-up (process start, model load)
included. The baseline in the same run is one worker. On a machine with one GPU per worker the second worker
doubles the GPU work; on this CPU-only machine both share the same cores, so the figure shows the cost or gain of
splitting the cores between processes rather than a second device.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import done_count  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests.pg_server import PostgresServer  # noqa: E402

DREAMLOOM = Path(sys.executable).parent / "dreamloom"


async def queue_jobs(settings: Settings, jobs: int, steps: int) -> None:
    studio = await Studio.open(settings)
    try:
        for n in range(jobs):
            await studio.submit_imagine(f"member{n % 6}", f"a red circle on a blue background --seed {n} --steps {steps}")
    finally:
        await studio.close()


def measure(server: PostgresServer, name: str, workers: int, jobs: int, steps: int, scratch: Path) -> dict:
    url = server.create_database(name)
    env = {**os.environ, "DREAMLOOM_DATABASE_URL": url, "DREAMLOOM_DATA_DIR": str(scratch / name),
           "DREAMLOOM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "DREAMLOOM_RESULT_CACHE": "false",
           "DREAMLOOM_MAX_QUEUED_PER_USER": "100", "DREAMLOOM_REGISTRY": str(ROOT / "tests" / "registry.toml")}
    env.pop("DISCORD_TOKEN", None)
    settings = Settings(database_url=url, data_dir=scratch / name, result_cache=False, max_queued_per_user=100,
                        registry=ROOT / "tests" / "registry.toml")
    asyncio.run(queue_jobs(settings, jobs, steps))
    threads = max(1, (os.cpu_count() or 2) // workers)
    started = time.monotonic()
    processes = [subprocess.Popen([str(DREAMLOOM), "worker"], env=env | {"DREAMLOOM_TORCH_THREADS": str(threads)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        while asyncio.run(done_count(settings)) < jobs:
            time.sleep(0.2)
        elapsed = time.monotonic() - started
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=120)
    return {"workers": workers, "torch_threads_each": threads, "seconds": round(elapsed, 2),
            "jobs_per_minute": round(jobs / elapsed * 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    server = PostgresServer()
    server.start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            one = measure(server, "bench_one", 1, args.jobs, args.steps, Path(scratch))
            two = measure(server, "bench_two", 2, args.jobs, args.steps, Path(scratch))
    finally:
        server.stop()
    print(json.dumps({"jobs": args.jobs, "steps": args.steps, "cpu_cores": os.cpu_count(), "one_worker": one,
                      "two_workers": two, "speedup": round(one["seconds"] / two["seconds"], 2)}, indent=2))


if __name__ == "__main__":
    main()
