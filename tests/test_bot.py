"""The Discord bot through the local Discord API double: the real discord.py client, studio, worker and engine."""
from __future__ import annotations

import asyncio

from tests.bot_world import BotWorld

QUICK = "--steps 4"


def run(coro):
    return asyncio.run(coro)


def test_imagine_from_command_to_grid(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double = world.double
            assert {c["name"] for c in double.commands} >= {"imagine", "settings", "models", "loras", "queue", "info",
                                                           "help", "gallery", "admin"}
            handle, message, job = await world.imagine(world.alice, f"a red circle on a blue background --seed 7 {QUICK}")
            assert handle.callbacks[0]["type"] == 5  # deferred within the 3-second window
            assert handle.acknowledged_at - handle.sent_at < 1.0
            edits = [r for r in double.requests if r.method == "PATCH" and handle.token in r.path]
            assert "queued" in edits[0].json["content"] or "starting" in edits[0].json["content"]
            assert any("step" in (r.json or {}).get("content", "") and r.files for r in edits), "progress with a preview"
            assert job.status == "done" and job.message_id == message["id"]
            grid = world.image_of(double.file_of(message))
            assert grid.size == (128, 128)
            ids = world.custom_ids(message)
            image_ids = [image.id for image in job.images]
            assert ids == [f"dl:u:{i}" for i in image_ids] + [f"dl:r:{job.id}"] + [f"dl:v:{i}" for i in image_ids]
            assert "seed 7" in message["content"] and "<@3001>" in message["content"]

    run(scenario())
