"""One running Dreamloom (studio, worker on the real starter model, the real discord.py bot) wired to the double."""
from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

from PIL import Image as PILImage

from bot.app import start_bot
from studio.service import Studio
from studio.settings import Settings
from studio.worker import Worker
from tests.conftest import ROOT
from tests.discord_double import ADMIN, DiscordDouble, Member

logging.getLogger("discord").setLevel(logging.WARNING)

REGISTRY = f"""
default = "starter-shapes"

[[models]]
name = "starter-shapes"
path = "{ROOT / 'models' / 'starter-shapes'}"
family = "starter"
description = "Flat and gradient coloured shapes."
tags = ["starter"]

[[models]]
name = "after-dark"
path = "{ROOT / 'models' / 'starter-shapes'}"
family = "starter"
description = "The starter model, tagged nsfw to test the NSFW policy."
tags = ["nsfw"]
"""


class BotWorld:
    """`async with BotWorld(engine, tmp_path) as world:` gives `world.double`, `world.studio`, members, helpers."""

    def __init__(self, engine, tmp_path: Path, *, recommended_shards: int = 1, **settings) -> None:
        self.engine = engine
        self.recommended_shards = recommended_shards  # what the double's GET /gateway/bot answers
        self.tmp_path = tmp_path
        self.overrides = settings
        self.alice = Member("3001", "alice")
        self.bob = Member("3002", "bob")
        self.admin = Member("3003", "ada", permissions=ADMIN)

    async def __aenter__(self) -> BotWorld:
        self.double = DiscordDouble()
        self.double.shard_count = self.recommended_shards
        await self.double.start()
        registry = self.tmp_path / "models.toml"
        registry.write_text(REGISTRY)
        self.settings = Settings(**{
            "data_dir": self.tmp_path / "data", "registry": registry, "discord_token": "test-token",
            "discord_api_base": self.double.api_base, "discord_gateway_url": self.double.gateway_url,
            "discord_progress_interval_s": 0.05, "lease_seconds": 6, **self.overrides})
        self.studio = await Studio.open(self.settings)
        self.engine_registry = self.engine.registry  # the worker points the shared engine at this test's registry
        self.stop_worker = asyncio.Event()
        self.worker = Worker(self.studio, self.engine, "test:1:1")
        self.worker_task = asyncio.create_task(self.worker.run(self.stop_worker, idle_seconds=0.05))
        await self.start_bot()
        return self

    async def start_bot(self, **options) -> None:
        self.stop_bot = await start_bot(self.studio, self.settings, announce=lambda line: None,
                                        poll_interval_s=1.0, **options)
        self.bot = self.stop_bot.bot
        await self.double.connected()
        await self.double.wait_for(lambda: self.bot.is_ready(), 60, "the bot to be ready")

    async def restart_bot(self, **options) -> None:
        """Stop the bot completely and start a new client (as a process restart would)."""
        await self.stop_bot()
        await self.start_bot(**options)

    async def __aexit__(self, *exc) -> None:
        # Every step bounded and every step run: a test that failed mid-job must fail, not hang in its teardown.
        self.stop_worker.set()
        try:
            await asyncio.wait_for(self.stop_bot(), 60)
            await asyncio.wait_for(self.worker_task, 120)
        finally:
            self.worker_task.cancel()
            await self.studio.close()
            await asyncio.wait_for(self.double.stop(), 60)
            self.engine.registry = self.engine_registry

    # -- helpers ----------------------------------------------------------------------------------------

    async def imagine(self, member: Member, prompt: str, **options) -> tuple:
        """Run /imagine and wait for the final grid; returns (interaction, message, job)."""
        handle = await self.double.slash(member, "imagine", {"prompt": prompt, **options.pop("extra", {})}, **options)
        message = await self.finished(handle)
        return handle, message, await self.job_of(message)

    async def job_of(self, message: dict | str, timeout: float = 60):
        """The job a message (or message id) shows. The bot records a message's job right after Discord answers the
        post that created it, so a test that saw the message may ask a moment too early: wait for the record."""
        message_id = message["id"] if isinstance(message, dict) else message
        return await self.double.wait_for(lambda: self.studio.job_for_message(message_id), timeout,
                                          f"the job of message {message_id}")

    async def finished(self, handle, timeout: float = 120) -> dict:
        """Wait until an interaction's message shows a final result (buttons or an error line)."""
        def done():
            message = self.double.original(handle)
            if message and (message["components"] or "\u274c" in message["content"] or "(cancelled)" in message["content"]):
                return message
            return None
        return await self.double.wait_for(done, timeout, "the job's result")

    async def error_reply(self, handle, timeout: float = 60) -> str:
        """The ephemeral error text an interaction got (an immediate reply or a follow-up)."""
        def found():
            for callback in handle.callbacks:
                data = callback.get("data") or {}
                if callback["type"] == 4 and data.get("flags", 0) & 64:
                    return data["content"]
            for request in self.double.requests:
                if request.method == "POST" and request.path.startswith(f"/webhooks/{self.double.app_id}/{handle.token}") \
                        and (request.json or {}).get("flags", 0) & 64:
                    return request.json["content"]
            return None
        return await self.double.wait_for(found, timeout, "an error reply")

    @staticmethod
    def image_of(data: bytes) -> PILImage.Image:
        return PILImage.open(io.BytesIO(data))

    @staticmethod
    def custom_ids(message: dict) -> list[str]:
        return [c["custom_id"] for row in message["components"] for c in row["components"] if "custom_id" in c]

    @staticmethod
    def dumps(value) -> str:
        return json.dumps(value, indent=1)[:2000]
