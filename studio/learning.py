"""The learning loop: verified votes become a base model's house style, and a member's become their `--p`.

`Studio` mixes this in. Learned LoRAs live in the data directory (`styles/NAME/`) and the `learned_styles` table,
never in the owner's models.toml; routing never picks them by description: they are added to a job by rule (the
active house style of its model unless `--style raw` or `--stylize 0`, the member's style with `--p`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from dreamloom.errors import InvalidPrompt, InvalidRequest, LimitReached, NotFound
from engine.params import LoraChoice, PromptRequest
from engine.registry import LoraSpec, ModelSpec, Registry
from storage.database import uninterrupted
from storage.learning import RatedImage, rated_images, verified_votes_since
from storage.models import Job, LearnedStyle, utcnow

log = logging.getLogger(__name__)

MIN_HOUSE = 8  # liked and disliked images each, with verified votes, before a house style is learned
MIN_PERSONAL = 8  # a member's own ratings, liked and disliked each, before their --p is learned
TRAINABLE_FAMILIES = ("starter", "sd15")  # the trainer's UNet + one CLIP text encoder
OBJECTIVES = ("kto", "dpo", "sft")  # engine.training.learn_style's, named here so checks need no torch
STYLE_PICTURES = ("before-after", "loss")  # kept beside each learned LoRA


@dataclass
class LearningPlan:
    """A learning run before its first step: what it learns from and what it will be called."""

    spec: ModelSpec
    kind: str  # house | personal
    voter: str | None
    name: str
    version: int
    folder: Path
    objective: str
    steps: int
    train: list[Any]  # engine.training.learn_style.StyleExample
    held_out: list[Any]
    liked: int
    disliked: int
    votes_from: datetime
    votes_to: datetime
    held_out_prompts: int

    @property
    def out(self) -> Path:
        """The LoRA file."""
        return self.folder / f"{self.name}.safetensors"


@dataclass(frozen=True)
class StyleView:
    """A learned style as the front doors show it."""

    name: str
    kind: str
    base_model: str
    owner_id: str | None
    version: int
    status: str
    objective: str
    steps: int
    weight: float
    liked: int
    disliked: int
    evaluation: dict[str, Any]
    created_at: str

    @classmethod
    def of(cls, row: LearnedStyle) -> StyleView:
        return cls(row.name, row.kind, row.base_model, row.owner_id, row.version, row.status, row.objective,
                   row.steps, row.weight, row.liked, row.disliked, dict(row.evaluation or {}),
                   row.created_at.isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        """JSON for the CLI and the web."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One sentence for a finished learning job: what was learned and whether it is in use."""
        accuracy = self.evaluation.get("held_out_accuracy")
        scored = f"held-out accuracy {accuracy:.2f} against the base's 0.50" if accuracy is not None else "not evaluated"
        whose = "house style" if self.kind == "house" else "personal style (--p)"
        if self.status == "active":
            return f"{self.name} is now the active {whose} of {self.base_model} ({scored})."
        reason = self.evaluation.get("not_promoted", self.status)
        return f"{self.name} was learned but is not in use: {reason} ({scored})."


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise InvalidRequest(f"The objective is one of {', '.join(OBJECTIVES)}; got {objective!r}.")


async def _learning_jobs(session, model: str) -> list[Job]:
    """The learning jobs of a base model still queued or running."""
    return list((await session.scalars(select(Job).where(
        Job.kind == "learn", Job.model == model, Job.status.in_(("queued", "running"))))).all())


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def strip_triggers(prompt: str, triggers: set[str]) -> str:
    """A caption without the LoRA trigger words routing added: the style should not be learned as a word."""
    parts = [part.strip() for part in prompt.split(",")]
    kept = [part for part in parts if part.lower() not in triggers]
    return ", ".join(part for part in kept if part)


class LearningMixin:
    """Learning, listing and applying learned styles (mixed into `Studio`)."""

    learned_loras: dict[str, LoraSpec]

    # -- applying ------------------------------------------------------------------------------------

    def runtime_registry(self) -> Registry:
        """models.toml's registry plus the learned styles, for the engine to load by name."""
        base: Registry = self.registry
        if not self.learned_loras:
            return base
        return dataclasses.replace(base, loras={**base.loras, **self.learned_loras})

    async def load_learned_styles(self) -> None:
        """Read the active and candidate learned styles into `learned_loras` (at open and after each change)."""
        async with self.db.session() as session:
            rows = (await session.scalars(select(LearnedStyle).where(LearnedStyle.status != "retired"))).all()
        learned = {}
        for row in rows:
            family = self.registry.models[row.base_model].family if row.base_model in self.registry.models else None
            if family is None:
                continue  # its base model is no longer registered
            learned[row.name] = LoraSpec(name=row.name, path=self.settings.data_dir / row.path, family=family,
                                         description="", weight=row.weight)
        self.learned_loras = learned
        self._active_styles = {(row.kind, row.base_model, row.owner_id): row for row in rows if row.status == "active"}

    async def learned_choices(self, prompt: PromptRequest, spec: ModelSpec, user_id: str) -> tuple[list[LoraChoice], str]:
        """The learned LoRAs a job gets, and a line for its route reason: the house style of its model at
        `--stylize` / 100 of its weight (none with `--style raw` or `--stylize 0`), and the member's style with
        `--p`. A `--p` without a personal style says how many more ratings it needs."""
        choices, reasons = [], []
        house = self._active_styles.get(("house", spec.name, None))
        if house is not None and prompt.style != "raw" and prompt.stylize > 0:
            weight = round(house.weight * prompt.stylize / 100, 3)
            choices.append(LoraChoice(house.name, weight))
            reasons.append(f"house style {house.name} at {weight:g} (--stylize {prompt.stylize})")
        if prompt.personalize:
            personal = self._active_styles.get(("personal", spec.name, user_id))
            if personal is None:
                needed = await self.personal_needs(user_id, spec.name)
                raise InvalidPrompt(f"You have no personal style for {spec.name} yet: {needed} Then ask for one "
                                    "with /personalize, and use --p.", "p")
            choices.append(LoraChoice(personal.name, personal.weight))
            reasons.append(f"personal style {personal.name} (--p)")
        return choices, "; ".join(reasons)

    async def personal_needs(self, user_id: str, model: str) -> str:
        """A sentence: how many more of their own ratings a member needs for a personal style of `model`."""
        async with self.db.session() as session:
            rows = await rated_images(session, model, voter=user_id, held_out_share=0.0)
        liked = sum(row.label for row in rows)
        disliked = len(rows) - liked
        if liked >= MIN_PERSONAL and disliked >= MIN_PERSONAL:
            return f"you have rated enough images ({liked} 👍, {disliked} 👎)."
        return (f"rate {max(0, MIN_PERSONAL - liked)} more image(s) 👍 and {max(0, MIN_PERSONAL - disliked)} more 👎 "
                f"made with {model} (you have {liked} 👍 and {disliked} 👎; {MIN_PERSONAL} of each are needed).")

    # -- learning ------------------------------------------------------------------------------------

    async def _rated(self, model: str | None, voter: str | None) -> tuple[ModelSpec, list[RatedImage]]:
        """The base model and its rated images, or a sentence saying what is missing."""
        spec = self.registry.get(model) if model else self.registry.get(self.registry.default)
        if spec.family not in TRAINABLE_FAMILIES:
            raise InvalidRequest(f"Learning a style trains SD1.5-family models for now; {spec.name} is {spec.family}.")
        async with self.db.session() as session:
            rows = await rated_images(session, spec.name, voter=voter)
        liked = sum(row.label for row in rows)
        disliked = len(rows) - liked
        minimum = MIN_PERSONAL if voter else MIN_HOUSE
        if liked < minimum or disliked < minimum:
            whose = "your" if voter else "the community's"
            raise InvalidRequest(f"Too few ratings to learn {whose} style for {spec.name}: {liked} liked and {disliked} "
                                 f"disliked images with verified votes; at least {minimum} of each are needed.")
        return spec, rows

    async def plan_learning(self, model: str | None = None, *, voter: str | None = None, objective: str = "kto",
                            steps: int | None = None) -> LearningPlan:
        """Everything a learning run needs before its first step: the data (captions without trigger words, split
        by prompt), the next version's name and folder."""
        _check_objective(objective)
        spec, rows = await self._rated(model, voter)
        kind = "personal" if voter else "house"
        triggers = {word.lower() for row in rows for name in row.loras if name in self.registry.loras
                    for word in self.registry.loras[name].triggers}

        def examples(held_out: bool):
            from engine.images import open_image
            from engine.training.learn_style import StyleExample  # torch, loaded only to learn

            return [StyleExample(open_image(self.store.read(row.path)), strip_triggers(row.prompt, triggers), row.label)
                    for row in rows if row.held_out == held_out]

        train, held_out = await asyncio.to_thread(examples, False), await asyncio.to_thread(examples, True)
        async with self.db.session() as session:
            latest = await session.scalar(select(func.max(LearnedStyle.version)).where(
                LearnedStyle.kind == kind, LearnedStyle.base_model == spec.name,
                LearnedStyle.owner_id.is_(None) if voter is None else LearnedStyle.owner_id == voter))
        version = (latest or 0) + 1
        name = f"house-{_safe(spec.name)}-v{version}" if kind == "house" else f"p-{_safe(voter)}-{_safe(spec.name)}-v{version}"
        liked = sum(row.label for row in rows)
        voted = [row.voted_at for row in rows]
        return LearningPlan(spec, kind, voter, name, version, self.settings.data_dir / "styles" / name, objective,
                            steps or self.settings.learn_steps, train, held_out, liked, len(rows) - liked,
                            min(voted), max(voted), len({row.prompt for row in rows if row.held_out}))

    def start_training(self, plan: LearningPlan, device: str):
        """The trainer of a plan (loads the base and encodes the images: blocking, on the GPU thread)."""
        from engine.training.learn_style import StyleTrainer

        return StyleTrainer(plan.train, plan.held_out, plan.spec, objective=plan.objective, steps=plan.steps,
                            device=device, cache_dir=self.settings.cache_dir)

    def finish_training(self, plan: LearningPlan, trainer) -> dict[str, Any]:
        """Evaluate a trained candidate and write its files: the LoRA (kohya layout, with its data and evaluation in
        the metadata), report.json, loss.png and before-after.png. Blocking, on the GPU thread."""
        from engine.training.learn_style import loss_curve_png

        accuracy = trainer.evaluate()
        plan.folder.mkdir(parents=True, exist_ok=True)
        extra = {"dreamloom.kind": plan.kind, "dreamloom.base_model": plan.spec.name, "dreamloom.version": str(plan.version),
                 "dreamloom.votes_from": plan.votes_from.isoformat(timespec="seconds"),
                 "dreamloom.votes_to": plan.votes_to.isoformat(timespec="seconds"),
                 "dreamloom.rated_images": f"{plan.liked} liked, {plan.disliked} disliked"}
        report = trainer.save(plan.out, accuracy=accuracy, title=plan.name, extra_metadata=extra)
        evaluation = report.to_dict() | {"held_out_prompts": plan.held_out_prompts}
        evaluation.pop("out", None)
        loss_curve_png(report.losses, plan.folder / "loss.png")
        prompts = list(dict.fromkeys(e.caption for e in plan.held_out))[:4] or \
            list(dict.fromkeys(e.caption for e in plan.train))[:4]
        trainer.before_after_png(plan.folder / "before-after.png", prompts)
        evaluation["files"] = ["loss.png", "before-after.png", "report.json", plan.out.name]
        if not report.beats_base:
            if not report.held_out_liked or not report.held_out_disliked:
                evaluation["not_promoted"] = ("the held-out prompts lack liked or disliked images to evaluate it on "
                                              "(ratings on more prompts are needed): kept as a candidate")
            else:
                evaluation["not_promoted"] = (f"held-out accuracy {report.held_out_accuracy:.2f} does not beat the "
                                              "base's 0.50: kept as a candidate")
        (plan.folder / "report.json").write_text(json.dumps(evaluation, indent=2))
        return evaluation

    async def register_learned(self, plan: LearningPlan, evaluation: dict[str, Any]) -> StyleView:
        """Keep a trained version in the database; it becomes the active one if it beats the base."""
        async with self.db.session() as session:
            row = LearnedStyle(name=plan.name, kind=plan.kind, base_model=plan.spec.name, owner_id=plan.voter,
                               version=plan.version, path=plan.out.relative_to(self.settings.data_dir).as_posix(),
                               objective=plan.objective, steps=plan.steps, weight=1.0, status="candidate",
                               liked=plan.liked, disliked=plan.disliked, votes_from=plan.votes_from,
                               votes_to=plan.votes_to, evaluation=evaluation)
            session.add(row)
            await session.flush()
            if evaluation.get("beats_base"):
                await self._activate(session, row)
            view = StyleView.of(row)
        await self.load_learned_styles()
        log.info("learned %s: %s, held-out accuracy %.3f (%s)", plan.name, plan.objective,
                 evaluation.get("held_out_accuracy", 0.5), view.status)
        return view

    async def learn(self, model: str | None = None, *, voter: str | None = None, objective: str = "kto",
                    steps: int | None = None, device: str | None = None, log_line=None) -> StyleView:
        """Learn the next version of a base model's house style (or `voter`'s personal style) now, in this process
        (the owner's `dreamloom learn --now`; members and admins queue a learning job with `submit_learn`)."""
        plan = await self.plan_learning(model, voter=voter, objective=objective, steps=steps)
        say = log_line or (lambda line: log.info("%s", line))

        def run() -> dict[str, Any]:
            trainer = self.start_training(plan, device or self.settings.device or "cpu")
            trainer.train(on_step=lambda p: say(json.dumps({"stage": "learn", "step": p.step, "steps": p.steps,
                                                            "loss": round(p.loss, 6)}))
                          if p.step % 25 == 1 or p.step == p.steps else None)
            return self.finish_training(plan, trainer)

        return await self.register_learned(plan, await asyncio.to_thread(run))

    @uninterrupted
    async def submit_learn(self, user_id: str, model: str | None = None, *, voter: str | None = None,
                           objective: str = "kto", steps: int | None = None, guild_id: str | None = None,
                           channel_id: str | None = None) -> Any:
        """Queue a learning job (house style, or `voter`'s personal style): checked now, so too few ratings are
        answered at once; one such job per style at a time."""
        _check_objective(objective)
        spec, _ = await self._rated(model, voter)
        steps = steps or self.settings.learn_steps
        kind = "personal" if voter else "house"
        async with self.db.session() as session:
            waiting = await _learning_jobs(session, spec.name)
        for job in waiting:
            if job.parameters.get("voter") == voter:
                raise LimitReached(f"The {kind} style of {spec.name} is already being learned (job {job.id}); "
                                   "follow it with /info or `dreamloom show`.")
        whose = "a personal style (--p)" if voter else "the house style"  # the job's headline names its member
        text = f"learn {whose} of {spec.name} ({objective}, {steps} steps)"
        from storage import queue

        return await self._enqueue(queue.NewJob(
            kind="learn", user_id=user_id, raw_prompt=text, prompt=text, model=spec.name, guild_id=guild_id,
            channel_id=channel_id, max_attempts=self.settings.max_attempts,
            parameters={"voter": voter, "objective": objective, "steps": steps},
            route_reason=f"learning from {'their own' if voter else 'verified'} votes"))

    def learning_checkpoint(self, job_id: int) -> Path:
        """Where a learning job keeps its checkpoint between slices (and across restarts)."""
        return self.settings.data_dir / "styles" / ".checkpoints" / f"job-{job_id}.pt"

    async def due_house_styles(self, now: datetime | None = None) -> list[str]:
        """Base models whose house style is due under `learn_every`: the last version is older than the interval
        (or there is none) and at least `learn_min_new_votes` verified votes came since; none queued already."""
        interval = self.settings.learn_interval
        if interval is None:
            return []
        now = now or utcnow()
        due = []
        async with self.db.session() as session:
            for spec in self.registry.models.values():
                if spec.family not in TRAINABLE_FAMILIES:
                    continue
                last = await session.scalar(select(func.max(LearnedStyle.created_at)).where(
                    LearnedStyle.kind == "house", LearnedStyle.base_model == spec.name))
                if last is not None and now - last < interval:
                    continue
                if await _learning_jobs(session, spec.name):
                    continue
                new_votes = await verified_votes_since(session, spec.name, last)
                if new_votes >= self.settings.learn_min_new_votes:
                    due.append(spec.name)
        return due

    async def _activate(self, session, row: LearnedStyle) -> None:
        await session.execute(update(LearnedStyle).where(
            LearnedStyle.kind == row.kind, LearnedStyle.base_model == row.base_model,
            LearnedStyle.owner_id.is_(None) if row.owner_id is None else LearnedStyle.owner_id == row.owner_id,
            LearnedStyle.status == "active", LearnedStyle.id != row.id).values(status="candidate"))
        row.status, row.activated_at = "active", utcnow()

    # -- managing ------------------------------------------------------------------------------------

    async def styles(self, model: str | None = None, *, owner: str | None = None) -> list[StyleView]:
        """Learned styles, newest first (house styles, or one member's when `owner` is given)."""
        async with self.db.session() as session:
            statement = select(LearnedStyle).order_by(LearnedStyle.created_at.desc(), LearnedStyle.id.desc())
            if model:
                statement = statement.where(LearnedStyle.base_model == model)
            if owner:
                statement = statement.where(LearnedStyle.owner_id == owner)
            return [StyleView.of(row) for row in (await session.scalars(statement)).all()]

    async def style(self, name: str) -> StyleView:
        """One learned style by name."""
        async with self.db.session() as session:
            row = await session.scalar(select(LearnedStyle).where(LearnedStyle.name == name))
            if row is None:
                raise NotFound(f"There is no learned style {name!r}.")
            return StyleView.of(row)

    async def style_picture(self, name: str, picture: str) -> bytes:
        """A learned style's `before-after` grid or `loss` curve (PNG), found through its row, never a given path."""
        if picture not in STYLE_PICTURES:
            raise NotFound(f"A style has no {picture!r} picture.")
        async with self.db.session() as session:
            path = await session.scalar(select(LearnedStyle.path).where(LearnedStyle.name == name))
        file = (self.settings.data_dir / path).parent / f"{picture}.png" if path else None
        if file is None or not file.is_file():
            raise NotFound(f"There is no {picture} picture of {name!r}.")
        return await asyncio.to_thread(file.read_bytes)

    async def set_style_status(self, name: str, status: str) -> StyleView:
        """Make a version the active one (a roll back or forward), keep it as a candidate, or retire it."""
        if status not in ("active", "candidate", "retired"):
            raise InvalidRequest("A style's status is active, candidate or retired.")
        async with self.db.session() as session:
            row = await session.scalar(select(LearnedStyle).where(LearnedStyle.name == name))
            if row is None:
                raise NotFound(f"There is no learned style {name!r}; `dreamloom styles` lists them.")
            if status == "active":
                await self._activate(session, row)
            else:
                row.status = status
            view = StyleView.of(row)
        await self.load_learned_styles()
        return view
