"""Train a LoRA with peft on a dataset folder (the studio's imagefolder or kohya export) and write a `.safetensors`
in kohya's layout, with its metadata, that A1111, ComfyUI, sd-scripts and diffusers' `load_lora_weights` load.

    dreamloom train-lora DATASET_DIR --base MODEL --trigger WORD --out FILE [--steps 400] [--rank 8]
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from dreamloom.errors import InvalidRequest
from engine.training.lora_files import kohya_metadata, save_kohya_lora
from engine.images import open_image
from engine.models import load_pipeline
from engine.registry import ModelSpec

# Attention and the ResNet convolutions: a style lives in textures and edges as much as in attention.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2"]


RECOMMENDED_IMAGES = 10  # fewer, and `train-lora` says what to expect before it spends the steps


@dataclass(frozen=True)
class LoraTrainingReport:
    """What a training run did."""

    out: Path
    images: int
    steps: int
    seconds: float
    first_loss: float
    last_loss: float

    def to_dict(self) -> dict:
        """JSON for the CLI."""
        return {"out": str(self.out), "images": self.images, "steps": self.steps, "seconds": round(self.seconds, 1),
                "first_loss": round(self.first_loss, 5), "last_loss": round(self.last_loss, 5)}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIXES = (".caption", ".txt")  # sd-scripts' default caption extension first
KOHYA_SUBSET = re.compile(r"(\d+)_(.+)")  # kohya's DreamBooth folders: `10_trigger class`


def _captioned_images(folder: Path, default_caption: str | None) -> list[tuple[Image.Image, str]]:
    """Images in `folder` with the caption of their `.caption` / `.txt` file (else `default_caption`, if any)."""
    pairs = []
    for image_file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        captions = [image_file.with_suffix(suffix) for suffix in CAPTION_SUFFIXES if image_file.with_suffix(suffix).is_file()]
        if captions:
            pairs.append((open_image(image_file), captions[0].read_text(encoding="utf-8").strip()))
        elif default_caption is not None:
            pairs.append((open_image(image_file), default_caption))
    return pairs


def read_dataset(folder: Path) -> tuple[list[tuple[Image.Image, str]], list[int], list[str]]:
    """(image, caption) pairs, how often each repeats and the folder each came from, from any of the layouts `dreamloom export` writes:
    an imagefolder (`metadata.jsonl`), kohya's `N_trigger class/` folders (captions from `.caption` or `.txt`
    files, the folder's words for images without one, each image repeated N times), or a flat folder of captioned
    images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidRequest(f"No dataset folder at {folder}.")
    pairs: list[tuple[Image.Image, str]] = []
    repeats: list[int] = []
    subset_names: list[str] = []
    metadata = folder / "metadata.jsonl"
    subsets = sorted(p for p in folder.iterdir() if p.is_dir() and KOHYA_SUBSET.fullmatch(p.name))
    if metadata.is_file():
        for line_number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((open_image(folder / row["file_name"]), str(row.get("text", ""))))
            except (ValueError, KeyError) as error:
                raise InvalidRequest(f"{metadata}: line {line_number} is not a valid entry ({error}).") from None
        repeats, subset_names = [1] * len(pairs), [folder.name] * len(pairs)
    elif subsets:
        for subset in subsets:
            count, words = KOHYA_SUBSET.fullmatch(subset.name).groups()
            found = _captioned_images(subset, words)
            pairs += found
            repeats += [max(1, int(count))] * len(found)
            subset_names += [subset.name] * len(found)
    else:
        pairs = _captioned_images(folder, None)
        repeats, subset_names = [1] * len(pairs), [folder.name] * len(pairs)
    if not pairs:
        raise InvalidRequest(f"{folder} holds no images with captions (metadata.jsonl, kohya `N_name/` folders, or "
                             "images with .caption / .txt files).")
    return pairs, repeats, subset_names


def encode_images_and_captions(pipe, images: list[Image.Image], captions: list[str], side: int, device: str):
    """VAE latents of the images (resized to `side`) and text-encoder embeddings of the captions, in chunks of 64."""
    with torch.no_grad():
        pixels = torch.stack([
            torch.from_numpy(np.asarray(image.convert("RGB").resize((side, side), Image.LANCZOS), dtype=np.float32)
                             / 127.5 - 1.0).permute(2, 0, 1) for image in images]).to(device)
        latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(64)])
        latents = latents * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        embeddings = torch.cat([pipe.text_encoder(chunk)[0] for chunk in ids.split(64)])
    return latents, embeddings


def add_trainable_lora(unet, rank: int, lr: float, steps: int, target_modules: list[str] | str = TARGET_MODULES):
    """A peft LoRA adapter on the UNet's attention and ResNet layers, with its AdamW optimiser and the learning-rate
    schedule (20 warm-up steps, then a cosine down to a tenth); returns (parameters, optimiser, schedule)."""
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))))
    return params, optimiser, schedule


def _subsets(captions: list[str], repeats: list[int], names: list[str]) -> dict[str, tuple[int, list[str]]]:
    """Captions and repeats per dataset folder, for the LoRA's metadata."""
    subsets: dict[str, tuple[int, list[str]]] = {}
    for caption, count, name in zip(captions, repeats, names):
        subsets.setdefault(name, (count, []))[1].append(caption)
    return subsets


def train_lora(dataset: Path, base: ModelSpec, trigger: str, out: Path, *, steps: int = 400, rank: int = 8,
               lr: float = 1e-3, batch: int = 16, seed: int = 0, device: str = "cpu", cache_dir: Path = Path("data/cache"),
               target_modules: list[str] | str = TARGET_MODULES, log=print) -> LoraTrainingReport:
    """Train and save a LoRA for `base`; every caption holds `trigger` (added at its end where it lacks it, where the
    router adds it to a prompt: the words before it keep their token positions, so what the base model learned
    about them, such as which colour goes where, still holds under the LoRA). `target_modules` is peft's: a list of
    module-name suffixes or one regular expression."""
    started = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InvalidRequest("--out must name a .safetensors file.")

    # 1. The dataset, with the trigger word in every caption.
    pairs, repeats, subset_names = read_dataset(dataset)
    if len(pairs) < RECOMMENDED_IMAGES:
        log(f"warning: {dataset} holds {len(pairs)} image(s); a LoRA trained on so few copies them rather than "
            f"learning a style. {RECOMMENDED_IMAGES} or more (20-50 is usual) give a style that carries over to new prompts.")
    captions = [text if trigger.lower() in text.lower() else f"{text}, {trigger}" for _, text in pairs]

    # 2. The base pipeline; only the LoRA weights train.
    pipe = load_pipeline(base, device, torch.float32, cache_dir)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    side = unet.config.sample_size * pipe.vae_scale_factor

    # 3. Latents and text embeddings, computed once.
    latents, embeddings = encode_images_and_captions(pipe, [image for image, _ in pairs], captions, side, device)

    # 4. The LoRA: peft adapter layers on the UNet.
    params, optimiser, schedule = add_trainable_lora(unet, rank, lr, steps, target_modules)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    unet.train()
    first = last = float("nan")
    for step in range(steps):
        if len(set(repeats)) == 1:
            index = torch.tensor([rng.randrange(len(pairs)) for _ in range(batch)], device=device)
        else:  # kohya subsets repeat their images N times an epoch: drawn N times as often
            index = torch.tensor(rng.choices(range(len(pairs)), weights=repeats, k=batch), device=device)
        clean = latents[index]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        target = scheduler.get_velocity(clean, noise, timesteps) if prediction_type == "v_prediction" else noise
        loss = F.mse_loss(unet(noisy, timesteps, embeddings[index]).sample, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        last = loss.item()
        if step == 0:
            first = last
        if step % 50 == 0 or step == steps - 1:
            log(json.dumps({"stage": "lora", "step": step, "loss": round(last, 5), "elapsed_s": round(time.time() - started, 1)}))

    # 5. Save in kohya's layout with sd-scripts' and model-spec metadata: A1111, ComfyUI and sd-scripts read it,
    #    and diffusers' `load_lora_weights` converts it on load.
    unet.eval()
    save_kohya_lora(get_peft_model_state_dict(unet), out, kohya_metadata(
        title=out.stem, base_name=base.name, family=base.family, trigger=trigger, rank=rank, alpha=rank, steps=steps,
        learning_rate=lr, resolution=side, subsets=_subsets(captions, repeats, subset_names),
        started=datetime.fromtimestamp(started, timezone.utc)))
    return LoraTrainingReport(out, len(pairs), steps, time.time() - started, first, last)
