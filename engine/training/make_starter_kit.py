"""Build the starter kit's LoRAs and niji model from the starter model (reproducible; about 40 min on 2 CPU cores).

    .venv/bin/python -m engine.training.make_starter_kit [--steps 1000] [--rank 16] [--lr 2e-3] [--only outline night pastel] [--device cpu]

1. Draw three styled datasets (outline, night, pastel) as imagefolders.
2. Train an outline LoRA and a night LoRA for the starter model with `train_lora` (the `dreamloom train-lora` code).
3. Train a pastel LoRA, fuse it into a copy of the starter model and save that as `models/starter-niji`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from engine.models import load_pipeline
from engine.registry import ModelSpec
from engine.training.styles import write_style_dataset
from engine.training.train_lora import train_lora
from engine.training.train_starter import loads_in_float32

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=["outline", "night", "pastel"])
    args = parser.parse_args()
    starter = ModelSpec("starter-shapes", ROOT / "models" / "starter-shapes", "starter")
    loras = ROOT / "models" / "loras"
    log_file = ROOT / "models" / "starter-kit.log.jsonl"

    def log(line: str) -> None:
        print(line, flush=True)
        with open(log_file, "a") as handle:
            handle.write(line + "\n")

    with tempfile.TemporaryDirectory() as scratch:
        for seed, (style, trigger) in enumerate((("outline", "lineart"), ("night", "nightfall"), ("pastel", "pastelwave"))):
            if style not in args.only:
                continue
            dataset = write_style_dataset(Path(scratch) / style, style, args.images, seed=seed)
            out = loras / f"{style}.safetensors" if style != "pastel" else Path(scratch) / "pastel.safetensors"
            report = train_lora(dataset, starter, trigger, out, steps=args.steps, rank=args.rank, lr=args.lr, device=args.device,
                                cache_dir=Path(scratch) / "cache", log=log)
            log(json.dumps({"style": style, **report.to_dict()}))
            if style == "pastel":
                # The niji model: the starter with the pastel LoRA fused in at full weight.
                pipe = load_pipeline(starter, "cpu", torch.float32, Path(scratch) / "cache")
                pipe.load_lora_weights(str(out), adapter_name="pastel")
                pipe.fuse_lora(lora_scale=1.0)
                pipe.unload_lora_weights()
                target = ROOT / "models" / "starter-niji"
                shutil.rmtree(target, ignore_errors=True)
                pipe.to(torch.float16).save_pretrained(target, safe_serialization=True)
                loads_in_float32(target)
                meta = json.loads((starter.path / "dreamloom.json").read_text())
                meta.update({"fused_lora": "pastel", "lora_steps": args.steps})
                (target / "dreamloom.json").write_text(json.dumps(meta, indent=1))
                log(json.dumps({"style": style, "saved": str(target)}))


if __name__ == "__main__":
    main()
