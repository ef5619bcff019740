"""The starter kit's LoRAs and niji model do what their descriptions promise, measured against the plain starter
model on the same prompts and seeds; the measures themselves are checked on drawn pictures first."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from engine.training import kit_checks
from engine.training.evaluate_starter import colour_check
from engine.training.scenes import random_scene, render
from engine.training.styles import render_styled


def _scenes(count: int, seed: int):
    rng = random.Random(seed)
    return [s for s in (random_scene(rng) for _ in range(count * 2)) if "black" not in (s.shape_colour, s.background_colour)][:count]


def test_the_contour_measure_finds_drawn_contours_and_only_those():
    scenes = _scenes(60, 1)
    outlined = [kit_checks.contour_dark_share(render_styled(s, "outline")) for s in scenes]
    plain = [kit_checks.contour_dark_share(render(s)) for s in scenes]
    assert np.mean(outlined) > 0.8 and np.mean(plain) < 0.02


def test_the_night_measure_tells_a_darker_scene_from_other_colours():
    scenes = _scenes(60, 2)
    right, shifted = [], []
    for scene in scenes:
        plain, night = render(scene), render_styled(scene, "night")
        matched = kit_checks.exposure_matched(plain, night)
        right.append(all(colour_check(matched, scene.shape_colour, scene.background_colour)))
        # The old night look: dark and blue-shifted, which changes the colours the prompt named.
        tinted = Image.fromarray(np.clip(np.asarray(night, dtype=float) * 0.7 + np.array([0, 0, 60]), 0, 255).astype(np.uint8))
        shifted.append(all(colour_check(kit_checks.exposure_matched(plain, tinted), scene.shape_colour,
                                        scene.background_colour)))
    assert np.mean(right) >= 0.95 and np.mean(shifted) < 0.8


def test_the_pastel_measure_prefers_pastel_pictures():
    scenes = _scenes(60, 3)
    pastel = [kit_checks.pastel_share(render_styled(s, "pastel")) for s in scenes]
    plain = [kit_checks.pastel_share(render(s)) for s in scenes]
    assert np.mean([p[0] for p in pastel]) > 2 * np.mean([p[0] for p in plain])
    assert np.mean([p[1] for p in pastel]) < np.mean([p[1] for p in plain])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("check", ["outline", "niji"])
def test_each_starter_kit_entry_passes_its_effect_check(engine, check):
    figures = kit_checks.CHECKS[check](engine, 8)
    print(figures)
    assert figures["passed"], figures


@pytest.fixture(scope="module")
def night_figures(engine):
    # The documented check (12 prompts x 2 seeds, as `kit_checks` and the README): a share of 95% needs more than
    # the 16 pictures the other checks use to allow one miss.
    return kit_checks.check_night(engine, 12)


def test_the_night_lora_darkens_the_scene_by_at_least_30_percent(night_figures):
    assert night_figures["darkening"] >= kit_checks.NIGHT_MIN_DARKENING, night_figures


def test_the_night_lora_keeps_the_colours_the_prompt_named(night_figures):
    assert night_figures["colour_adherence"] >= kit_checks.NIGHT_MIN_ADHERENCE, night_figures
