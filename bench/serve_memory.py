"""Resident memory of `dreamloom serve` across many consecutive starter-model jobs. Prints JSON.

    .venv/bin/python bench/serve_memory.py [--jobs 1000]

RSS is sampled after every 100 finished jobs; flat means the last sample is within 5% of
the first one taken after warm-up (job 100).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import done_count, rss_mib  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402


async def submit_all(settings: Settings, jobs: int) -> None:
    studio = await Studio.open(settings)
    for i in range(jobs):
        await studio.submit_imagine(f"user{i % 50}", f"a red circle on a blue background --n 1 --steps 4 --seed {i}")
    await studio.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "DREAMLOOM_DATA_DIR": data, "DREAMLOOM_MAX_QUEUED_PER_USER": str(args.jobs), "HF_HUB_OFFLINE": "1"}
        settings = Settings(data_dir=Path(data), max_queued_per_user=args.jobs)
        asyncio.run(submit_all(settings, args.jobs))
        server = subprocess.Popen([str(Path(sys.executable).parent / "dreamloom"), "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples, started, next_mark = [], time.time(), 100
        try:
            while next_mark <= args.jobs:
                done = asyncio.run(done_count(settings))
                if done >= next_mark:
                    samples.append({"jobs_done": done, "rss_mib": round(rss_mib(server.pid), 1)})
                    next_mark += 100
                time.sleep(1)
        finally:
            server.terminate()
            server.wait(timeout=120)
    first, last = samples[0]["rss_mib"], samples[-1]["rss_mib"]
    print(json.dumps({"jobs": args.jobs, "seconds": round(time.time() - started, 1), "samples": samples,
                      "growth_pct_after_warmup": round(100 * (last / first - 1), 2)}, indent=2))


if __name__ == "__main__":
    main()
