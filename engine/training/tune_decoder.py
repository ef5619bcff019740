"""Teach the starter VAE's decoder the kit's styles (reproducible; about 20 min on 2 CPU cores).

    .venv/bin/python -m engine.training.tune_decoder [--steps 800] [--out FOLDER]

The starter VAE was trained on the eight palette colours only, so its decoder painted any latent of a darker or
outlined picture as the nearest palette picture: a night scene's dark navy came out bright green, a black contour a
blur (measured: a 3-pixel contour kept 42% of its dark pixels). A LoRA that learns the night look in latent space
can then only show other colours. Here the encoder stays frozen, so every latent (and so the UNets and LoRAs
trained on them) keeps its meaning, and only the decoder learns to draw plain, night, outlined and pastel scenes
from their latents. The result replaces the VAE of the starter model and of the niji model (they share it).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from engine.training.scenes import random_scene, render
from engine.training.styles import NIGHT_LIGHT, render_styled
from engine.training.train_starter import to_tensor

ROOT = Path(__file__).resolve().parents[2]
# Plain scenes keep most of the weight: the base model's pictures must decode as before.
MIX = (("plain", 0.35), ("night", 0.35), ("outline", 0.2), ("pastel", 0.1))
# A night picture's colour errors are half as large in pixels as the same errors in daylight, yet the night check
# reads its colours after brightening it back: its reconstruction error counts (1 / NIGHT_LIGHT)^2 as much.
NIGHT_LOSS_WEIGHT = 1 / NIGHT_LIGHT**2


def _picture(rng: random.Random):
    """(a drawn picture, its weight in the loss)."""
    style = rng.choices([name for name, _ in MIX], weights=[weight for _, weight in MIX])[0]
    scene = random_scene(rng)
    picture = render(scene) if style == "plain" else render_styled(scene, style)
    return picture, NIGHT_LOSS_WEIGHT if style == "night" else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pictures", type=int, default=4000, help="drawn once; batches are drawn from them")
    parser.add_argument("--out", type=Path, default=None,
                        help="save the VAE here instead of into the starter and niji models (to evaluate it first)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    source = ROOT / "models" / "starter-shapes" / "vae"
    vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32)
    vae.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    started = time.time()
    # Drawing is slower than a decoder step on a CPU: draw a pool once.
    drawn = [_picture(rng) for _ in range(args.pictures)]
    pool = to_tensor([picture for picture, _ in drawn])
    pool_weights = torch.tensor([weight for _, weight in drawn])
    log_file = ROOT / "models" / "starter-kit.log.jsonl"
    for step in range(args.steps):
        index = torch.randint(0, len(pool), (args.batch,))
        pixels, weights = pool[index], pool_weights[index]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
        reconstruction = vae.decode(latents).sample
        error = reconstruction - pixels
        per_picture = error.pow(2).mean((1, 2, 3)) + 0.1 * error.abs().mean((1, 2, 3))
        loss = (per_picture * weights).sum() / weights.sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            line = json.dumps({"stage": "decoder", "step": step, "loss": round(loss.item(), 5),
                               "elapsed_s": round(time.time() - started, 1)})
            print(line, flush=True)
            with open(log_file, "a") as handle:
                handle.write(line + "\n")
    vae.eval()
    targets = [args.out] if args.out else [ROOT / "models" / model / "vae" for model in ("starter-shapes", "starter-niji")]
    for target in targets:
        vae.to(torch.float16).save_pretrained(target, safe_serialization=True)


if __name__ == "__main__":
    main()
