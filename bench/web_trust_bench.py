"""What trust costs a web request: the session lookup, the CSRF check and the rate limiter. Prints JSON.

    .venv/bin/python bench/web_trust_bench.py [--samples 300]

In process through the real aiohttp application (network excluded), on SQLite: a gallery page, a thumbnail and
the image API read anonymously (the baseline) and by a signed-in member (one session lookup more), and a vote
through the web (session, CSRF, rate limiter, vote) against the same vote made by calling the studio directly.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import percentiles  # noqa: E402

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from gallery.app import create_app  # noqa: E402
from storage import sessions  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests.test_studio import finish  # noqa: E402


async def timed(samples: int, call) -> dict:
    durations = []
    for _ in range(samples):
        started = time.perf_counter()
        await call()
        durations.append(time.perf_counter() - started)
    return percentiles(durations)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        # Generous limits: this measures their cost, not their effect.
        settings = Settings(data_dir=Path(folder), discord_client_id="1", discord_client_secret="s",
                            web_rate_votes="100000/minute", web_rate_per_address="100000/minute",
                            max_votes_per_minute=100000)
        studio = await Studio.open(settings)
        job = await studio.submit_imagine("discord:1", "a red circle --n 1")
        image_id, = await finish(studio, job.id, count=1)  # the tests' completion without an engine (a small PNG)
        async with studio.db.session() as session:
            token, row = await sessions.create_session(session, "discord:2", verified=True, guild_ids=[],
                                                       lifetime=timedelta(days=1))
            csrf = row.csrf_token
        client = TestClient(TestServer(create_app(studio)))
        await client.start_server()
        signed = {"Cookie": f"dreamloom_session={token}"}

        async def get(path, headers=None):
            async with client.get(path, headers=headers or {}) as response:
                assert response.status == 200, (path, response.status)
                await response.read()

        async def web_vote():
            async with client.post(f"/api/images/{image_id}/vote", json={"value": 1},
                                   headers={**signed, "X-CSRF-Token": csrf}) as response:
                assert response.status == 200, await response.text()

        await get("/")  # warm up: templates compiled, the thumbnail made
        await get(f"/thumbs/{image_id}.webp")
        report = {"samples": args.samples}
        for name, path in (("gallery page", "/?period=all"), ("thumbnail", f"/thumbs/{image_id}.webp"),
                           ("image API", f"/api/images/{image_id}")):
            report[name] = {"anonymous (baseline)": await timed(args.samples, lambda: get(path)),
                            "signed in": await timed(args.samples, lambda: get(path, signed))}
        report["vote"] = {"studio.vote directly (baseline)": await timed(args.samples, lambda: studio.community.vote(
                              image_id, "discord:3", 1, source="web")),
                          "through the web (session, CSRF, limiter)": await timed(args.samples, web_vote)}
        await client.close()
        await studio.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
