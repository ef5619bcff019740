"""Gallery server time with 100k images and 1M votes, on SQLite and PostgreSQL. Prints JSON.

    .venv/bin/python bench/gallery_bench.py [--images 100000] [--votes-per-image 10] [--no-postgres]

Requests go through the real aiohttp application in process (query and template rendering
included, network excluded): the first gallery page of each period, LoRA pages (a LoRA used by 10% of
jobs and one used by 0.5%) and image pages.
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

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from gallery.app import create_app  # noqa: E402
from storage.models import Image, Job, JobLora, User, Vote, utcnow  # noqa: E402
from storage.ranking import wilson_lower_bound  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402

USERS = 2000
SAMPLES = 100



async def fill(studio: Studio, images: int, votes_per_image: int) -> None:
    rng = random.Random(0)
    now = utcnow()
    async with studio.db.session() as session:
        await session.execute(insert(User), [{"id": f"u{i}", "display_name": f"u{i}", "defaults": {}, "banned": False,
                                              "queued_count": 0, "created_at": now} for i in range(USERS)])
    batch = 5000
    for start in range(1, images + 1, batch):
        jobs, rows, votes, job_loras = [], [], [], []
        for image_id in range(start, min(images, start + batch - 1) + 1):
            created = now - timedelta(minutes=rng.randrange(60 * 24 * 30))
            draw = rng.random()
            lora = "outline" if draw < 0.10 else "night" if draw < 0.105 else None
            if lora:
                job_loras.append({"job_id": image_id, "name": lora})
            jobs.append({"id": image_id, "kind": "imagine", "status": "done", "priority": 0,
                         "user_id": f"u{rng.randrange(USERS)}", "raw_prompt": f"prompt {image_id}",
                         "prompt": f"prompt {image_id}", "negative_prompt": "", "parameters": {"n": 1},
                         "loras": [{"name": lora, "weight": 1.0}] if lora else [],
                         "model": "starter-shapes", "attempts": 1, "max_attempts": 3, "cancel_requested": False,
                         "created_at": created, "settings": {"seeds": [image_id]}})
            voters = rng.sample(range(USERS), votes_per_image)
            values = [1 if rng.random() < 0.6 else -1 for _ in voters]
            up = sum(v > 0 for v in values)
            rows.append({"id": image_id, "job_id": image_id, "index_in_job": 1, "seed": image_id, "width": 64, "height": 64,
                         "sha256": f"{image_id:064x}", "path": f"00/00/{image_id}.png", "created_at": created,
                         "up_votes": up, "down_votes": len(values) - up, "score": wilson_lower_bound(up, len(values) - up)})
            votes += [{"user_id": f"u{u}", "image_id": image_id, "value": v, "source": "web", "created_at": created}
                      for u, v in zip(voters, values)]
        async with studio.db.session() as session:
            await session.execute(insert(Job), jobs)
            await session.execute(insert(Image), rows)
            if job_loras:
                await session.execute(insert(JobLora), job_loras)
            await session.execute(insert(Vote), votes)
    if studio.db.is_sqlite:
        async with studio.db.engine.connect() as connection:
            await connection.exec_driver_sql("ANALYZE")
    if not studio.db.is_sqlite:
        async with studio.db.engine.connect() as connection:
            await connection.exec_driver_sql("COMMIT")
            for table in ("jobs", "images", "votes", "users", "job_loras"):
                await connection.exec_driver_sql(f"ANALYZE {table}")


async def measure(url: str | None, data: Path, images: int, votes_per_image: int) -> dict:
    settings = Settings(data_dir=data, registry=ROOT / "models.toml", database_url=url)
    studio = await Studio.open(settings)
    started = time.perf_counter()
    await fill(studio, images, votes_per_image)
    filled = time.perf_counter() - started
    client = TestClient(TestServer(create_app(studio)))
    await client.start_server()
    report: dict = {"images": images, "votes": images * votes_per_image, "fill_s": round(filled, 1)}
    rng = random.Random(2)

    async def timed_gets(path) -> dict:
        """SAMPLES requests of `path()` (a fresh path each time); p50/p95 of their server time."""
        times = []
        for _ in range(SAMPLES):
            t = time.perf_counter()
            response = await client.get(path())
            await response.read()
            times.append(time.perf_counter() - t)
            assert response.status == 200
        return percentiles(times)

    for period in ("day", "week", "all", "new"):
        report[f"first_page_{period}"] = await timed_gets(lambda: f"/?period={period}")
    report["lora_page_common_all"] = await timed_gets(lambda: "/lora/outline?period=all")
    report["lora_page_rare_week"] = await timed_gets(lambda: "/lora/night?period=week")
    report["image_page"] = await timed_gets(lambda: f"/image/{rng.randrange(1, images + 1)}")
    await client.close()
    await studio.close()
    return report


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--votes-per-image", type=int, default=10)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as folder:
        report["sqlite"] = await measure(None, Path(folder) / "sqlite", args.images, args.votes_per_image)
        print(json.dumps(report["sqlite"]), file=sys.stderr)
        if not args.no_postgres:
            from tests.pg_server import PostgresServer

            server = PostgresServer()
            server.start()
            try:
                url = server.create_database("gallery_bench")
                report["postgresql"] = await measure(url, Path(folder) / "pg", args.images, args.votes_per_image)
            finally:
                server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
