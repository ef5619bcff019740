"""Measure how well a starter model follows its prompts (a colour check).

    python -m engine.training.evaluate_starter --model models/starter-shapes --prompts 64 --seeds 4

For each prompt "a <colour> <shape> on a <colour> background" and each seed: the
background colour is read at the four corners, the shape colour is the most common
palette colour among the pixels that are not the background's. Both are compared
with what the prompt asked for.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np

from engine.generation import ImagineRequest
from engine.params import parse_prompt
from engine.registry import ModelSpec, Registry
from engine.training.scenes import PALETTE, SHAPES, nearest_colour

_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float64)
_NAMES = list(PALETTE)


def colour_check(image, shape_colour: str, background_colour: str) -> tuple[bool, bool]:
    """(shape colour right, background colour right) for one generated image."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width, _ = array.shape
    patch = max(2, width // 16)
    corners = np.concatenate([array[:patch, :patch], array[:patch, -patch:], array[-patch:, :patch],
                              array[-patch:, -patch:]]).reshape(-1, 3)
    background = nearest_colour(tuple(np.median(corners, axis=0)))
    # The background may be a vertical gradient: estimate it per row from the left and right edges,
    # then the shape is whatever differs clearly from its row's background.
    edges = np.concatenate([array[:, :2], array[:, -2:]], axis=1)
    row_background = np.median(edges, axis=1, keepdims=True)
    distance = np.sqrt(((array - row_background) ** 2).sum(-1))
    shape_pixels = array[distance > 60]
    shape = None
    if len(shape_pixels) >= 0.01 * width * height:
        labels = ((shape_pixels[:, None, :] - _PALETTE_ARRAY) ** 2).sum(-1).argmin(1)
        shape = _NAMES[Counter(labels.tolist()).most_common(1)[0][0]]
    return shape == shape_colour, background == background_colour


def evaluation_prompts(count: int, seed: int = 1234) -> list[tuple[str, str, str]]:
    """`count` (prompt, shape colour, background colour), balanced over colour pairs and shapes."""
    pairs = [(a, b) for a, b in itertools.permutations(PALETTE, 2)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    result = []
    for index in range(count):
        shape_colour, background_colour = pairs[index % len(pairs)]
        # Each pass over the colour pairs shifts the shapes, so no prompt repeats.
        shape = SHAPES[(index + index // len(pairs)) % len(SHAPES)]
        article = "an" if shape_colour[0] in "aeiou" else "a"
        result.append((f"{article} {shape_colour} {shape} on a {background_colour} background", shape_colour, background_colour))
    return result


def evaluate(engine, prompts: int, seeds: int, steps: int | None = None) -> dict:
    """Adherence figures over `prompts` x `seeds` generations."""
    shape_ok = background_ok = both_ok = total = 0
    failures = []
    started = time.perf_counter()
    for index, (text, shape_colour, background_colour) in enumerate(evaluation_prompts(prompts)):
        suffix = f" --seed {1000 + index * 10} --n {seeds}" + (f" --steps {steps}" if steps else "")
        result = engine.imagine(ImagineRequest(parse_prompt(text + suffix)))
        for image, seed in zip(result.images, result.seeds):
            shape_right, background_right = colour_check(image, shape_colour, background_colour)
            shape_ok += shape_right
            background_ok += background_right
            both_ok += shape_right and background_right
            total += 1
            if not (shape_right and background_right) and len(failures) < 20:
                failures.append({"prompt": text, "seed": seed})
    return {
        "images": total, "shape_colour": round(shape_ok / total, 4), "background_colour": round(background_ok / total, 4),
        "both": round(both_ok / total, 4), "seconds": round(time.perf_counter() - started, 1), "failures": failures,
    }


def main() -> None:
    from engine.service import Engine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/starter-shapes"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--record", action="store_true", help="store the figures in the model's dreamloom.json")
    args = parser.parse_args()
    spec = ModelSpec("starter", args.model, "starter")
    engine = Engine(Registry({"starter": spec}, "starter"), Path("data/cache"), device="cpu")
    figures = evaluate(engine, args.prompts, args.seeds, args.steps)
    print(json.dumps(figures, indent=2))
    if args.record:
        meta_path = args.model / "dreamloom.json"
        meta = json.loads(meta_path.read_text())
        meta["adherence"] = {k: v for k, v in figures.items() if k != "failures"} | {"prompts": args.prompts, "seeds": args.seeds}
        meta_path.write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
