"""Model affinity: model loads per 100 mixed jobs over two workers and two models, with and without. Prints JSON.

    .venv/bin/python bench/affinity_bench.py [--jobs 100]

Six members queue 100 jobs, each on one of two models at random (the same jobs for both policies). Two workers take
turns claiming through the real queue (storage/queue.py, on SQLite); each holds one model at a time, as a
GPU with room for one model does: a job on the other model is a model load. No pictures are generated: this
measures the claim policy. Fairness is reported as the longest a member's next job waited, in claims.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage import queue  # noqa: E402
from storage.database import Database, sqlite_url  # noqa: E402


async def run_policy(url: str, plan: list[tuple[str, str]], affinity: bool) -> dict:
    db = Database(url)
    await db.upgrade()
    async with db.session() as session:
        for user, model in plan:
            await queue.enqueue(session, queue.NewJob(kind="imagine", user_id=user, raw_prompt="x", prompt="x",
                                                      model=model, seed=1), max_queued_per_user=10_000)
    held = {"w1": None, "w2": None}
    loads, claims, waits, queued_at = 0, 0, {}, {}
    order = 0
    while True:
        took = False
        for worker in ("w1", "w2"):
            async with db.session() as session:
                loaded = (held[worker],) if affinity and held[worker] else ()
                job = await queue.claim(session, worker, 30, loaded_models=loaded)
                if job is None:
                    continue
                job.status = "done"
            took = True
            claims += 1
            if held[worker] != job.model:
                loads += 1
                held[worker] = job.model
            order += 1
            queued_at.setdefault(job.user_id, 0)
            waits[job.user_id] = max(waits.get(job.user_id, 0), order - queued_at[job.user_id])
            queued_at[job.user_id] = order
        if not took:
            break
    await db.close()
    return {"model_loads": loads, "jobs": claims, "loads_per_100_jobs": round(100 * loads / claims, 1),
            "longest_gap_between_a_members_jobs": max(waits.values())}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    args = parser.parse_args()
    rng = random.Random(0)
    users = [f"member{i}" for i in range(6)]
    plan = [(rng.choice(users), rng.choice(["model-a", "model-b"])) for _ in range(args.jobs)]
    report = {"bench": "model_affinity", "jobs": args.jobs, "workers": 2, "models": 2}
    with tempfile.TemporaryDirectory() as scratch:
        for name, affinity in (("without", False), ("with", True)):
            url = sqlite_url(Path(scratch) / name)
            report[name] = await run_policy(url, plan, affinity)
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
