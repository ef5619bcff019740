"""Learn a style from votes: a LoRA trained on liked and disliked images of one base model, evaluated on held-out
prompts, written in kohya's layout with what it learned from in its metadata.

Objectives (peft LoRA on the UNet; the frozen base is the reference, which peft gives by disabling the adapter):
- `kto`: Diffusion-KTO (Li et al. 2024, reference code jacklishufan/diffusion-kto): per-image binary feedback. The
  implicit reward of an image is how much better the model predicts its noise than the reference does,
  g = loss_ref - loss_model; with the batch's mean reward (clamped at 0) as the KL reference point,
  loss = w_y * (1 - sigmoid(sign_y * beta * (g - kl))).
- `dpo`: Diffusion-DPO (Wallace et al. 2023, reference code SalesforceAIResearch/DiffusionDPO): pairs of a liked
  and a disliked image of the same prompt, each pair under the same noise and timestep;
  loss = -log sigmoid(-beta/2 * ((l_w - l_l) - (ref_w - ref_l))).
- `sft`: plain fine-tuning on the liked images only.

Training runs in bounded slices (`StyleTrainer.train(until=...)`) with a checkpoint between them, so a worker can
interleave members' generations with it and resume it after a crash.

Evaluation: on the held-out images, the implicit reward (averaged over fixed noise and timesteps) should rank a
liked image above a disliked one; the base ranks every pair as a tie (accuracy 0.5).
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageDraw

from dreamloom.errors import GenerationCancelled, InvalidRequest
from engine.models import load_pipeline
from engine.registry import ModelSpec
from engine.training.lora_files import kohya_metadata, save_kohya_lora
from engine.training.train_lora import add_trainable_lora, encode_images_and_captions

OBJECTIVES = ("kto", "dpo", "sft")


@dataclass(frozen=True)
class StyleExample:
    """One rated image: its picture, its caption (the prompt) and the label (1 liked, 0 disliked)."""

    image: Image.Image
    caption: str
    label: int


@dataclass
class StyleReport:
    """What a training run did and how the candidate scored on held-out prompts."""

    out: Path
    objective: str
    steps: int
    seconds: float
    train_liked: int
    train_disliked: int
    held_out_liked: int
    held_out_disliked: int
    held_out_accuracy: float  # the candidate's; the base scores 0.5 (every pair a tie)
    losses: list[float] = field(default_factory=list)

    @property
    def beats_base(self) -> bool:
        """Whether the candidate ranks held-out liked images above disliked ones more often than the base."""
        return self.held_out_accuracy > 0.5

    def to_dict(self) -> dict:
        """JSON for the CLI and the version's report file."""
        return {"out": str(self.out), "objective": self.objective, "steps": self.steps, "seconds": round(self.seconds, 1),
                "train": {"liked": self.train_liked, "disliked": self.train_disliked},
                "held_out": {"liked": self.held_out_liked, "disliked": self.held_out_disliked},
                "held_out_accuracy": round(self.held_out_accuracy, 4), "base_accuracy": 0.5,
                "beats_base": self.beats_base, "first_loss": round(self.losses[0], 6) if self.losses else None,
                "last_loss": round(self.losses[-1], 6) if self.losses else None}


def _latents_and_embeddings(pipe, examples: list[StyleExample], side: int, device: str):
    return encode_images_and_captions(pipe, [e.image for e in examples], [e.caption for e in examples], side, device)


def _per_sample_loss(unet, scheduler, latents, embeddings, noise, timesteps) -> torch.Tensor:
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if scheduler.config.prediction_type == "v_prediction" \
        else noise
    prediction = unet(noisy, timesteps, embeddings).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


@torch.no_grad()
def implicit_rewards(unet, scheduler, latents, embeddings, draws: int = 8, seed: int = 1234) -> torch.Tensor:
    """Each image's implicit reward, loss_reference - loss_model, averaged over `draws` fixed (noise, timestep)
    pairs so that every model is scored on the same draws."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(latents))
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        timesteps = timesteps.to(latents.device)
        model = _per_sample_loss(unet, scheduler, latents, embeddings, noise, timesteps)
        with reference_model(unet):
            reference = _per_sample_loss(unet, scheduler, latents, embeddings, noise, timesteps)
        total += (reference - model).cpu()
    return total / draws


@contextlib.contextmanager
def reference_model(unet):
    """The frozen base: the UNet with its LoRA adapter switched off for the duration."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def preference_accuracy(rewards: torch.Tensor, labels: list[int]) -> float:
    """How often a liked image's reward is above a disliked one's, over every (liked, disliked) pair; ties count
    half (so a model that cannot tell them apart scores 0.5)."""
    liked = rewards[[i for i, label in enumerate(labels) if label == 1]]
    disliked = rewards[[i for i, label in enumerate(labels) if label == 0]]
    if len(liked) == 0 or len(disliked) == 0:
        return 0.5
    difference = liked[:, None] - disliked[None, :]
    return float(((difference > 0).float() + 0.5 * (difference == 0).float()).mean())


def loss_curve_png(losses: list[float], path: Path, size: tuple[int, int] = (480, 200)) -> None:
    """A plain loss curve (a moving average over up to 10 steps), drawn with PIL."""
    width, height = size
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    if len(losses) >= 2:
        window = min(10, max(1, len(losses) // 2))  # a short run keeps a curve, not one averaged point
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        low, high = float(smooth.min()), float(smooth.max()) or 1.0
        span = (high - low) or 1.0
        points = [(20 + i * (width - 40) / max(1, len(smooth) - 1), height - 20 - (v - low) / span * (height - 40))
                  for i, v in enumerate(smooth)]
        draw.line(points, fill=(30, 90, 200), width=2)
        draw.text((22, 4), f"loss ({window}-step average) {high:.4f} .. {low:.4f}", fill="black")
        draw.text((22, height - 16), f"steps 1 .. {len(losses)}", fill="black")
    draw.rectangle([20, 20, width - 20, height - 20], outline=(180, 180, 180))
    picture.save(path)


def pairs_by_prompt(examples: list[StyleExample]) -> list[tuple[int, int]]:
    """(liked, disliked) index pairs of images made from the same caption: what Diffusion-DPO compares."""
    by_caption: dict[str, tuple[list[int], list[int]]] = {}
    for index, example in enumerate(examples):
        by_caption.setdefault(example.caption, ([], []))[1 - example.label].append(index)
    return [(w, l) for liked, disliked in by_caption.values() for w in liked for l in disliked]


@dataclass(frozen=True)
class TrainingProgress:
    """Reported after every step."""

    step: int
    steps: int
    loss: float
    elapsed_s: float


class StyleTrainer:
    """A style LoRA being trained: build it (loads the base, encodes every image once), `train` it in slices,
    checkpoint and resume it, then `evaluate` and `save` it. Blocking: run it on the engine's GPU thread."""

    def __init__(self, train: list[StyleExample], held_out: list[StyleExample], base: ModelSpec, *,
                 objective: str = "kto", steps: int = 400, rank: int = 8, lr: float = 5e-4, beta: float | None = None,
                 batch: int = 16, seed: int = 0, device: str = "cpu", cache_dir: Path = Path("data/cache")) -> None:
        if objective not in OBJECTIVES:
            raise InvalidRequest(f"The objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
        self.train_examples, self.held_out, self.base = train, held_out, base
        self.objective, self.steps, self.rank, self.lr, self.batch, self.device = objective, steps, rank, lr, batch, device
        # The papers' scales: Diffusion-KTO's beta on the reward, Diffusion-DPO's beta_dpo (5000 for SD1.5).
        self.beta = beta if beta is not None else (5000.0 if objective == "dpo" else 2000.0)
        self.liked = [i for i, e in enumerate(train) if e.label == 1]
        self.disliked = [i for i, e in enumerate(train) if e.label == 0]
        self.pairs = pairs_by_prompt(train)
        if not self.liked or (objective == "kto" and not self.disliked):
            raise InvalidRequest("Learning needs liked images" + (" and disliked ones" if objective == "kto" else "") + ".")
        if objective == "dpo" and not self.pairs:
            raise InvalidRequest("dpo needs a liked and a disliked image of the same prompt; use kto for these votes.")
        self.started = time.time()
        self.step = 0
        self.losses: list[float] = []
        # Noise, timesteps and batches come from generators of their own, kept in checkpoints: a resumed run draws
        # what the uninterrupted one would have, and generations between slices do not disturb them.
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

        # 1. The base pipeline, frozen; latents and text embeddings of every image, computed once.
        torch.manual_seed(seed)  # the LoRA's initial weights
        self.pipe = load_pipeline(base, device, torch.float32, cache_dir)
        self.unet = self.pipe.unet
        for module in (self.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
        self.side = self.unet.config.sample_size * self.pipe.vae_scale_factor
        self.latents, self.embeddings = _latents_and_embeddings(self.pipe, train, self.side, device)
        self.labels = torch.tensor([float(e.label) for e in train], device=device)

        # 2. The LoRA: peft adapter layers on the UNet; disabling them gives the reference model.
        self.params, self.optimiser, self.schedule = add_trainable_lora(self.unet, rank, lr, steps)
        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)

    @property
    def done(self) -> bool:
        """Whether every step has run."""
        return self.step >= self.steps

    def _batch(self) -> list[int]:
        if self.objective == "kto":  # half liked, half disliked, so both signals reach every step
            half = self.batch // 2
            return [self.rng.choice(self.liked) for _ in range(half)] + \
                [self.rng.choice(self.disliked) for _ in range(self.batch - half)]
        if self.objective == "dpo":  # winners then losers, pair by pair
            chosen = [self.rng.choice(self.pairs) for _ in range(max(1, self.batch // 2))]
            return [w for w, _ in chosen] + [l for _, l in chosen]
        return [self.rng.choice(self.liked) for _ in range(self.batch)]

    def _loss(self, index: list[int]) -> torch.Tensor:
        index_tensor = torch.tensor(index, device=self.device)
        clean, context, label = self.latents[index_tensor], self.embeddings[index_tensor], self.labels[index_tensor]
        count = len(index) // 2 if self.objective == "dpo" else len(index)
        noise = torch.randn((count, *clean.shape[1:]), generator=self.generator).to(self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (count,), generator=self.generator)
        if self.objective == "dpo":  # a pair shares its noise and timestep
            noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
        timesteps = timesteps.to(self.device)
        model_loss = _per_sample_loss(self.unet, self.scheduler, clean, context, noise, timesteps)
        if self.objective == "sft":
            return model_loss.mean()
        with torch.no_grad(), reference_model(self.unet):
            reference_loss = _per_sample_loss(self.unet, self.scheduler, clean, context, noise, timesteps)
        if self.objective == "kto":
            # Diffusion-KTO: the implicit reward against the frozen base, the batch's mean as reference point.
            reward = reference_loss - model_loss
            kl = reward.mean().detach().clamp(min=0)
            sign = 2 * label - 1
            return (1 - torch.sigmoid(sign * self.beta * (reward - kl))).mean()
        # Diffusion-DPO: the winner's loss should fall further below the loser's than under the reference.
        model_w, model_l = model_loss.chunk(2)
        reference_w, reference_l = reference_loss.chunk(2)
        inside = -0.5 * self.beta * ((model_w - model_l) - (reference_w - reference_l))
        return -F.logsigmoid(inside).mean()

    def train(self, until: int | None = None, *, max_seconds: float | None = None, cancel=None, on_step=None) -> None:
        """Run steps up to `until` (default: all), stopping early after `max_seconds`; `cancel` (an Event) raises
        GenerationCancelled at the next step; `on_step(TrainingProgress)` after each step."""
        until = min(self.steps, until if until is not None else self.steps)
        slice_started = time.monotonic()
        self.unet.train()
        while self.step < until:
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("Learning was cancelled.")
            # 3. A batch; 4. the objective's loss; one optimiser step.
            loss = self._loss(self._batch())
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimiser.step()
            self.schedule.step()
            self.losses.append(loss.item())
            self.step += 1
            if on_step is not None:
                on_step(TrainingProgress(self.step, self.steps, self.losses[-1], round(time.time() - self.started, 1)))
            if max_seconds is not None and time.monotonic() - slice_started >= max_seconds:
                break

    def checkpoint(self, path: Path) -> None:
        """Save what resuming needs (the LoRA, the optimiser, the generators, the losses), atomically."""
        state = {"step": self.step, "losses": self.losses, "objective": self.objective, "steps": self.steps,
                 "lora": get_peft_model_state_dict(self.unet), "optimiser": self.optimiser.state_dict(),
                 "schedule": self.schedule.state_dict(), "rng": self.rng.getstate(),
                 "generator": self.generator.get_state(), "elapsed_s": time.time() - self.started}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(path)

    def resume(self, path: Path) -> bool:
        """Continue from a checkpoint of the same run; False when there is none (or it is of another run)."""
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("objective") != self.objective or state.get("steps") != self.steps:
            return False
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.unet, state["lora"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])
        self.step, self.losses = state["step"], list(state["losses"])
        self.started = time.time() - state.get("elapsed_s", 0.0)
        return True

    def evaluate(self) -> float:
        """5. Held-out preference accuracy of the candidate (the base's is 0.5 by construction)."""
        self.unet.eval()
        if not self.held_out:
            return 0.5
        held_latents, held_embeddings = _latents_and_embeddings(self.pipe, self.held_out, self.side, self.device)
        rewards = implicit_rewards(self.unet, self.scheduler, held_latents, held_embeddings)
        return preference_accuracy(rewards, [e.label for e in self.held_out])

    def before_after_png(self, path: Path, prompts: list[str], *, columns: int = 4, seed: int = 7, steps: int = 20,
                         cell: int = 192) -> None:
        """The base (top row) and the candidate (bottom row) on the same prompts and seeds (the prompts repeat with
        new seeds to fill `columns`), labelled, each picture shown at `cell` pixels at least."""
        self.unet.eval()
        chosen = [prompts[index % len(prompts)] for index in range(columns)]
        rows = []
        for adapter_on in (False, True):
            context = contextlib.nullcontext() if adapter_on else reference_model(self.unet)
            with context, torch.no_grad():
                rows.append([self.pipe(prompt, num_inference_steps=steps, height=self.side, width=self.side,
                                       generator=torch.Generator().manual_seed(seed + index)).images[0]
                             for index, prompt in enumerate(chosen)])
        cell, label = max(cell, self.side), 16
        sheet = Image.new("RGB", (cell * columns, 2 * (cell + label)), "white")
        draw = ImageDraw.Draw(sheet)
        for row, (title, images) in enumerate(zip(("base", "learned style"), rows)):
            top = row * (cell + label)
            draw.text((4, top + 2), title, fill="black")
            for column, image in enumerate(images):
                sheet.paste(image.resize((cell, cell), Image.Resampling.BICUBIC), (column * cell, top + label))
        sheet.save(path)

    def save(self, out: Path, *, accuracy: float, title: str | None = None, trigger: str = "",
             extra_metadata: dict[str, str] | None = None) -> StyleReport:
        """6. The LoRA in kohya's layout, with what it learned from and how it scored."""
        held_out = self.held_out
        report = StyleReport(out, self.objective, self.step, time.time() - self.started, len(self.liked),
                             len(self.disliked), sum(e.label for e in held_out), sum(1 - e.label for e in held_out),
                             accuracy, self.losses)
        metadata = kohya_metadata(
            title=title or out.stem, base_name=self.base.name, family=self.base.family, trigger=trigger, rank=self.rank,
            alpha=self.rank, steps=self.step, learning_rate=self.lr, resolution=self.side,
            subsets={"liked": (1, [e.caption for e in self.train_examples if e.label == 1]),
                     "disliked": (1, [e.caption for e in self.train_examples if e.label == 0])},
            started=datetime.fromtimestamp(self.started, timezone.utc))
        metadata.update({"dreamloom.objective": self.objective, "dreamloom.liked": str(report.train_liked),
                         "dreamloom.disliked": str(report.train_disliked),
                         "dreamloom.held_out_accuracy": f"{accuracy:.4f}", **(extra_metadata or {})})
        out.parent.mkdir(parents=True, exist_ok=True)
        save_kohya_lora(get_peft_model_state_dict(self.unet), out, metadata)
        return report


def train_style(train: list[StyleExample], held_out: list[StyleExample], base: ModelSpec, out: Path, *,
                objective: str = "kto", steps: int = 400, rank: int = 8, lr: float = 5e-4, beta: float | None = None,
                batch: int = 16, seed: int = 0, device: str = "cpu", cache_dir: Path = Path("data/cache"),
                title: str | None = None, trigger: str = "", extra_metadata: dict[str, str] | None = None,
                log=print) -> StyleReport:
    """Train a style LoRA for `base` from rated images in one go and save it to `out` (kohya layout, metadata)."""
    trainer = StyleTrainer(train, held_out, base, objective=objective, steps=steps, rank=rank, lr=lr, beta=beta,
                           batch=batch, seed=seed, device=device, cache_dir=cache_dir)

    def on_step(progress: TrainingProgress) -> None:
        if progress.step % 25 == 1 or progress.step == progress.steps:
            log(json.dumps({"stage": "learn", "objective": objective, "step": progress.step, "steps": progress.steps,
                            "loss": round(progress.loss, 6), "elapsed_s": progress.elapsed_s}))

    trainer.train(on_step=on_step)
    accuracy = trainer.evaluate()
    return trainer.save(out, accuracy=accuracy, title=title, trigger=trigger, extra_metadata=extra_metadata)
