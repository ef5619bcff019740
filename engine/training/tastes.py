"""A simulated community's tastes on the starter model, and how to measure them: the learning loop's yardstick.

A taste is a property of a picture that no prompt names (a green background, bright pictures). The learning bench,
the full loop run and the CI test rate images by one, and measure its share on neutral prompts (no colour named)
with and without a learned style, beside shape-colour adherence on named-colour prompts (the starter's evaluator).
"""
from __future__ import annotations

import numpy as np

from engine.generation import ImagineRequest
from engine.params import parse_prompt
from engine.training.evaluate_starter import colour_check, evaluation_prompts

SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["", " on the left", " on the right", " at the top", " at the bottom", " in the center"]
SIZES = ["", "small ", "large "]


def taste(name: str):
    """A predicate on images: `background:COLOUR` (a palette colour) or `bright`."""
    if name.startswith("background:"):
        colour = name.split(":", 1)[1]
        return lambda image: colour_check(image, "-", colour)[1]
    if name == "bright":
        return lambda image: float(np.asarray(image.convert("RGB"), dtype=float).mean()) > 140
    raise ValueError(f"unknown taste {name!r}: background:COLOUR or bright")


def neutral_prompts() -> list[str]:
    """72 prompts that name a shape, a size and a place, never a colour."""
    return [f"a {size}{shape}{place}" for shape in SHAPES for place in PLACES for size in SIZES]


def taste_shares(engine, prompts: list[str], predicates: dict, suffix: str = "", seed_base: int = 50_000) -> dict:
    """For each named predicate, the share of images (a grid of four per prompt, fixed seeds, 12 steps) that have
    it; one set of images serves them all."""
    hits: dict = {name: [] for name in predicates}
    for index, prompt in enumerate(prompts):
        result = engine.imagine(ImagineRequest(parse_prompt(f"{prompt}{suffix} --seed {seed_base + index * 4} --steps 12")))
        for name, predicate in predicates.items():
            hits[name] += [predicate(image) for image in result.images]
    return {name: float(np.mean(found)) for name, found in hits.items()}


def taste_share(engine, prompts: list[str], predicate, suffix: str = "", seed_base: int = 50_000) -> float:
    """The share of images (a grid of four per prompt, fixed seeds, 12 steps) that have the taste."""
    return taste_shares(engine, prompts, {"taste": predicate}, suffix, seed_base)["taste"]


def adherence(engine, suffix: str = "", count: int = 32) -> float:
    """The share of images whose shape has the colour the prompt named (two per prompt, fixed seeds)."""
    right = []
    for index, (text, shape_colour, background_colour) in enumerate(evaluation_prompts(count)):
        result = engine.imagine(ImagineRequest(parse_prompt(f"{text}{suffix} --seed {1000 + index * 10} --n 2")))
        right += [colour_check(image, shape_colour, background_colour)[0] for image in result.images]
    return float(np.mean(right))
