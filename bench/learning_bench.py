"""What learning from votes changes, by objective, on the starter model. Prints JSON.

    .venv/bin/python bench/learning_bench.py [--objectives kto dpo sft] [--steps 400] [--taste background:green]

A simulated community rates images of neutral prompts (no colour named) by a taste no prompt names, e.g. a purple
background, or bright pictures. For each objective, in the same run and on the same votes: the share of the taste
on held-out neutral prompts and fresh seeds without and with the learned LoRA (the shift), colour adherence on
named-colour prompts with it (the starter's evaluator), held-out preference accuracy, training time and peak memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engine.generation import ImagineRequest  # noqa: E402
from engine.params import parse_prompt  # noqa: E402
from engine.registry import load_registry  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.training.learn_style import OBJECTIVES, StyleExample, train_style  # noqa: E402
from engine.training.tastes import adherence, neutral_prompts, taste, taste_share  # noqa: E402
from storage.learning import held_out_prompt  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--taste", default="background:green")
    parser.add_argument("--adherence-prompts", type=int, default=32)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    registry = load_registry(ROOT / "tests" / "registry.toml")
    engine = Engine(registry, scratch / "cache", device="cpu")
    predicate = taste(args.taste)
    # 1. The community's images and votes.
    examples = []
    for index, prompt in enumerate(neutral_prompts()):
        for image in engine.imagine(ImagineRequest(parse_prompt(f"{prompt} --seed {index * 4} --steps 12"))).images:
            examples.append((StyleExample(image, prompt, int(predicate(image))), held_out_prompt(prompt)))
    train = [e for e, held in examples if not held]
    held_out = [e for e, held in examples if held]
    evaluation = [p for p in neutral_prompts() if held_out_prompt(p)] or neutral_prompts()[:8]
    report = {"taste": args.taste, "images": len(examples), "liked_share": round(np.mean([e.label for e, _ in examples]), 4),
              "base": {"taste_share": taste_share(engine, evaluation, predicate),
                       "shape_colour_adherence": adherence(engine, "", args.adherence_prompts)}}
    # 2. Each objective on the same votes.
    for objective in args.objectives:
        out = scratch / f"{objective}.safetensors"
        started = time.perf_counter()
        trained = train_style(train, held_out, registry.get("starter-shapes"), out, objective=objective,
                              steps=args.steps, cache_dir=scratch / "cache", log=lambda line: None)
        seconds = time.perf_counter() - started
        text = (ROOT / "tests" / "registry.toml").read_text().replace('path = "../models/', f'path = "{ROOT}/models/')
        text += f'\n[[loras]]\nname = "{objective}"\npath = "{out}"\nfamily = "starter"\nweight = 1.0\n'
        (scratch / "models.toml").write_text(text)
        styled = Engine(load_registry(scratch / "models.toml"), scratch / "cache", device="cpu")
        report[objective] = {
            "steps": args.steps, "train_s": round(seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "held_out_accuracy": round(trained.held_out_accuracy, 4),
            "taste_share": taste_share(styled, evaluation, predicate, f" <lora:{objective}:1>"),
            "shape_colour_adherence": adherence(styled, f" <lora:{objective}:1>", args.adherence_prompts),
        }
        styled.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
