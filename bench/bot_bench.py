"""Discord: time from an interaction to its acknowledgement, at queue depths 0, 100 and 10 000. Prints JSON.

    .venv/bin/python bench/bot_bench.py [--depths 0 100 10000] [--samples 100]

The real discord.py client runs against the local Discord API double (tests/discord_double.py) with the real
studio on SQLite; no worker runs, so the queue keeps its depth. For each /imagine we measure, on the double's
clock, (1) the interaction callback (the defer Discord needs within 3 s) and (2) the edit that shows the
job's queue position and ETA. Baseline in the same run: a /help reply, which touches no database.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, update  # noqa: E402

from bench.common import percentiles  # noqa: E402
from bot.app import start_bot  # noqa: E402
from storage.models import Job, User, utcnow  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests.discord_double import DiscordDouble, Member  # noqa: E402


async def fill_queue(studio: Studio, depth: int) -> None:
    """`depth` queued jobs spread over 500 members, inserted directly (the benchmark times the bot, not inserts)."""
    users = [f"discord:{9000 + i}" for i in range(500)]
    now = utcnow()
    async with studio.db.session() as session:
        await session.execute(insert(User), [{"id": u, "display_name": u, "defaults": {}, "banned": False,
                                              "queued_count": 0, "created_at": now} for u in users])
        rng = random.Random(0)
        rows = [{"kind": "imagine", "status": "queued", "priority": 0, "user_id": rng.choice(users),
                 "raw_prompt": "a red circle", "prompt": "a red circle", "negative_prompt": "", "parameters": {},
                 "model": "starter-shapes", "loras": [], "seed": i, "attempts": 0, "max_attempts": 3,
                 "cancel_requested": False, "created_at": now} for i in range(depth)]
        for start in range(0, len(rows), 5000):
            await session.execute(insert(Job), rows[start:start + 5000])
        for user in users:
            await session.execute(update(User).where(User.id == user).values(queued_count=depth // 500 + 1))


async def measure(depth: int, samples: int) -> dict:
    logging.getLogger("discord").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        double = DiscordDouble()
        await double.start()
        settings = Settings(data_dir=Path(folder), discord_token="bench", discord_api_base=double.api_base,
                            discord_gateway_url=double.gateway_url, max_queued_per_user=10_000)
        studio = await Studio.open(settings)
        if depth:
            await fill_queue(studio, depth)
        stop = await start_bot(studio, settings, announce=lambda line: None)
        await double.connected()
        await double.wait_for(lambda: stop.bot.is_ready(), 20)
        defer, acknowledged, help_reply = [], [], []
        for index in range(samples):
            member = Member(str(5000 + index), f"m{index}")
            handle = await double.slash(member, "imagine", {"prompt": f"a red circle on a blue background --seed {index}"})
            await double.wait_for(lambda: any(r.method == "PATCH" and handle.token in r.path for r in double.requests), 20)
            edit = next(r for r in double.requests if r.method == "PATCH" and handle.token in r.path)
            assert "position" in edit.json["content"], edit.json
            defer.append(handle.acknowledged_at - handle.sent_at)
            acknowledged.append(edit.at - handle.sent_at)
            helper = await double.slash(member, "help")
            await double.wait_for(lambda: helper.acknowledged_at, 20)
            help_reply.append(helper.acknowledged_at - helper.sent_at)
        await stop()
        await studio.close()
        await double.stop()
    return {"queue_depth": depth, "defer": percentiles(defer), "acknowledged_with_position": percentiles(acknowledged),
            "baseline_help_reply": percentiles(help_reply)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 100, 10_000])
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    results = [asyncio.run(measure(depth, args.samples)) for depth in args.depths]
    print(json.dumps({"benchmark": "discord_acknowledgement", "target_p95_ms": 100, "results": results}, indent=2))


if __name__ == "__main__":
    main()
