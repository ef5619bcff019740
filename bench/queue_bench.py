"""Queue and vote latency as the tables grow (1k, 100k, 1M rows), on SQLite and PostgreSQL. Prints JSON.

    .venv/bin/python bench/queue_bench.py [--sizes 1000 100000 1000000] [--no-postgres]

For each size the tables are filled with that many jobs (10% queued, spread over 1000
users), as many images and as many votes; then we time claiming the next job, recording
a vote, and the queue overhead of one job (submit, claim, complete; no engine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import percentiles  # noqa: E402

from sqlalchemy import insert, update  # noqa: E402

from storage import queue, votes  # noqa: E402
from storage.database import Database  # noqa: E402
from storage.models import Image, Job, User, Vote, utcnow  # noqa: E402

USERS = 1000
SAMPLES = 300



async def fill(db: Database, rows: int) -> list[int]:
    now = utcnow()
    rng = random.Random(0)
    queued_per_user = [0] * USERS
    image_ids: list[int] = []
    async with db.session() as session:
        await session.execute(insert(User), [{"id": f"u{i}", "display_name": f"u{i}", "defaults": {}, "banned": False,
                                              "queued_count": 0, "created_at": now} for i in range(USERS)])
    batch = 20_000
    for start in range(0, rows, batch):
        jobs, images, vote_rows = [], [], []
        for job_id in range(start + 1, min(rows, start + batch) + 1):
            user = rng.randrange(USERS)
            queued = rng.random() < 0.1
            queued_per_user[user] += queued
            jobs.append({"id": job_id, "kind": "imagine", "status": "queued" if queued else "done", "priority": 0,
                         "user_id": f"u{user}", "raw_prompt": "a red circle", "prompt": "a red circle",
                         "negative_prompt": "", "parameters": {"n": 1}, "loras": [], "attempts": 0, "max_attempts": 3,
                         "cancel_requested": False, "created_at": now - timedelta(seconds=rows - job_id)})
            if not queued:
                image_ids.append(job_id)
                images.append({"id": job_id, "job_id": job_id, "index_in_job": 1, "seed": job_id, "width": 64,
                               "height": 64, "sha256": f"{job_id:064x}", "path": f"x/{job_id}.png", "created_at": now})
                vote_rows.append({"user_id": f"u{rng.randrange(USERS)}", "image_id": job_id, "value": 1,
                                  "source": "cli", "created_at": now})
        async with db.session() as session:
            await session.execute(insert(Job), jobs)
            if images:
                await session.execute(insert(Image), images)
                await session.execute(insert(Vote), vote_rows)
    async with db.session() as session:
        for user, count in enumerate(queued_per_user):
            if count:
                await session.execute(User.__table__.update().where(User.id == f"u{user}").values(queued_count=count))
    if not db.is_sqlite:
        async with db.engine.connect() as connection:
            await connection.exec_driver_sql("COMMIT")
            for table in ("jobs", "images", "votes", "users"):
                await connection.exec_driver_sql(f"ANALYZE {table}")
            # Rows were inserted with explicit ids: move the id sequences past them.
            for table in ("jobs", "images"):
                await connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
    return image_ids


async def measure(url: str, rows: int) -> dict:
    db = Database(url)
    await db.upgrade()
    started = time.perf_counter()
    image_ids = await fill(db, rows)
    filled = time.perf_counter() - started
    rng = random.Random(1)
    claims, vote_times, overhead = [], [], []
    for i in range(SAMPLES):
        t = time.perf_counter()
        async with db.session() as session:
            job = await queue.claim(session, "bench", 30, lock=not db.is_sqlite)
        claims.append(time.perf_counter() - t)
        assert job is not None
        async with db.session() as session:  # untimed: back into the queue, so its size stays the same
            await session.execute(update(Job).where(Job.id == job.id).values(status="queued", attempts=0, lease_owner=None))
            await session.execute(update(User).where(User.id == job.user_id).values(queued_count=User.queued_count + 1))
        t = time.perf_counter()
        async with db.session() as session:
            await votes.set_vote(session, f"u{rng.randrange(USERS)}", rng.choice(image_ids), rng.choice((1, -1)), "cli")
        vote_times.append(time.perf_counter() - t)
    for i in range(SAMPLES):
        # Queue overhead of one job, engine excluded: submit, claim, complete. It is an upscale, so the
        # claim picks it ahead of the 10% backlog and the time is that of the whole path through the queue.
        t = time.perf_counter()
        async with db.session() as session:
            new = await queue.enqueue(session, queue.NewJob("upscale", "u1", "a red circle"), max_queued_per_user=10**9)
        async with db.session() as session:
            job = await queue.claim(session, "bench", 30, lock=not db.is_sqlite)
        started_at = time.perf_counter()
        async with db.session() as session:
            await queue.complete(session, job.id, "bench", [], {"seeds": [1]})
        overhead.append(started_at - t)
        assert job.id == new.id
    await db.close()
    return {"rows": rows, "fill_s": round(filled, 1), "claim": percentiles(claims), "vote": percentiles(vote_times),
            "submit_to_start": percentiles(overhead)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    report: dict = {"sqlite": [], "postgresql": []}
    with tempfile.TemporaryDirectory() as folder:
        for rows in args.sizes:
            report["sqlite"].append(await measure(f"sqlite+aiosqlite:///{folder}/bench-{rows}.db", rows))
            print(json.dumps(report["sqlite"][-1]), file=sys.stderr)
    if not args.no_postgres:
        from tests.pg_server import PostgresServer

        server = PostgresServer()
        server.start()
        try:
            for rows in args.sizes:
                report["postgresql"].append(await measure(server.create_database(f"bench_{rows}"), rows))
                print(json.dumps(report["postgresql"][-1]), file=sys.stderr)
        finally:
            server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
