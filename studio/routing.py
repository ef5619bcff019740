"""The router learns from use: prompts whose members chose a model or LoRA themselves, and whose results other
verified members liked, become examples for that choice on their server (bounded, decaying, removable)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import func, select

from engine.params import parse_prompt
from engine.routing import (LearnedExamples, RouteDecision, RouteExample, example_vector, example_weight, niji_model,
                            route)
from storage import route_examples
from storage.models import Image, Job, Vote

log = logging.getLogger("dreamloom.studio")

LEARNS_FROM = ("imagine", "reroll")  # jobs whose prompt is the member's own (variations and upscales are not)


def scope_of(guild_id: str | None) -> str:
    """The server whose examples a prompt routes with: its guild, or "" for the web gallery and the CLI."""
    return guild_id or ""


class RoutingMixin:
    """Routing with a server's learned examples (mixed into Studio)."""

    _route_memory: dict[str, tuple[Any, LearnedExamples]]

    def route(self, text: str, *, owner: bool = False, guild_id: str | None = None) -> RouteDecision:
        """The model and LoRAs a prompt would run on, and why (`dreamloom route`), with the server's learned
        examples as last loaded (`refresh_route_examples`).

        Only the machine's `owner` (the local CLI) may name a model by its path; members name registered models.
        """
        self.refresh_registry()
        memory = self._route_memory.get(scope_of(guild_id))
        return route(self.registry, parse_prompt(text), allow_paths=owner, learned=memory[1] if memory else None)

    async def refresh_route_examples(self, guild_id: str | None) -> LearnedExamples | None:
        """Load a server's learned examples again when they changed in the database (another process may have
        learned or removed some): one small query when nothing changed."""
        scope = scope_of(guild_id)
        async with self.db.session() as session:
            current = await route_examples.version(session, scope)
            known = self._route_memory.get(scope)
            if known is not None and known[0] == current:
                return known[1]
            rows = await route_examples.examples(session, scope) if current[0] else []
        learned = LearnedExamples(
            [RouteExample(row.id, row.text, row.target, row.embedding, row.learned_at.timestamp()) for row in rows],
            half_life_days=self.settings.route_example_half_life_days)
        self._route_memory[scope] = (current, learned)
        return learned

    async def learn_route_example(self, image_id: int) -> int:
        """After an up-vote: when the image's job chose its model or LoRAs explicitly and enough verified members
        other than its author liked its images, its prompt becomes an example of each choice on its server.
        Returns how many examples were kept (0 when it does not qualify)."""
        if not self.settings.route_learning:
            return 0
        async with self.db.session() as session:
            job = await session.scalar(select(Job).join(Image, Image.job_id == Job.id).where(Image.id == image_id))
            if job is None or job.kind not in LEARNS_FROM:
                return 0
            up_votes = await session.scalar(
                select(func.count(func.distinct(Vote.user_id))).join(Image, Image.id == Vote.image_id).where(
                    Image.job_id == job.id, Vote.value == 1, Vote.verified.is_(True), Vote.user_id != job.user_id))
            job_id, author, scope = job.id, job.user_id, scope_of(job.guild_id)
            chosen = (job.parameters or {}).get("chosen") or {}
            targets = [t for t in chosen.get("targets", []) if t in self.registry.models or t in self.registry.loras]
            text = str(chosen.get("text", "")).strip()
        if up_votes < self.settings.route_learn_min_upvotes:
            return 0
        if not targets or not text:
            return 0
        vector = await asyncio.to_thread(example_vector, text)
        async with self.db.session() as session:
            for target in targets:
                await route_examples.record_example(session, scope, text, target, vector, job_id=job_id,
                                                    chosen_by=author, up_votes=up_votes,
                                                    max_per_scope=self.settings.route_examples_max)
        await self.refresh_route_examples(scope or None)
        log.info("routing learned %r -> %s on %s (%d up-votes)", text, ", ".join(targets), scope or "the web", up_votes)
        return len(targets)

    def _explicit_targets(self, prompt) -> list[str]:
        """The registered models and LoRAs a prompt named itself (`--model`, `--niji`, `<lora:...>`, `--lora`);
        kept with the job (`parameters.chosen`) when it is queued, before the member's defaults are added."""
        targets = []
        if prompt.model and prompt.model in self.registry.models:
            targets.append(prompt.model)
        elif prompt.niji:
            niji = niji_model(self.registry)
            targets += [niji.name] if niji is not None else []
        targets += [choice.name for choice in prompt.loras if choice.name in self.registry.loras]
        return targets

    async def route_examples(self, guild_id: str | None = None, target: str | None = None, *,
                             all_servers: bool = False) -> list[dict[str, Any]]:
        """The learned examples (newest first) with their weight today: `dreamloom route-examples`."""
        async with self.db.session() as session:
            rows = await route_examples.examples(session, None if all_servers else scope_of(guild_id), target)
        half_life = self.settings.route_example_half_life_days
        now = time.time()
        return [{"id": row.id, "server": row.scope or "web/cli", "text": row.text, "target": row.target,
                 "chosen_by": row.chosen_by, "up_votes": row.up_votes, "learned_at": row.learned_at.isoformat(),
                 "weight": round(float(example_weight((now - row.learned_at.timestamp()) / 86400, half_life)), 3)}
                for row in rows]

    async def forget_route_examples(self, *, ids: list[int] | None = None, guild_id: str | None = None,
                                    target: str | None = None, all_servers: bool = False) -> int:
        """Remove learned examples (by id, or a server's, or a target's); returns how many went."""
        scope = None if all_servers else scope_of(guild_id)
        async with self.db.session() as session:
            removed = await route_examples.remove(session, ids=ids, scope=scope, target=target)
            scopes = await route_examples.scopes(session)
        for known in set(self._route_memory) | set(scopes):
            await self.refresh_route_examples(known or None)
        return removed
