"""X/Y comparison grids (`dreamloom xy`, `/admin compare`): axes are checked before any GPU work, every cell uses the
same seed, and a swept merge's ends are its parents, pixel for pixel (computed in memory, nothing written)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamloom.errors import InvalidRequest
from engine.compare import LABEL_HEIGHT, Axis, CompareRequest, cells
from engine.generation import ImagineRequest
from engine.merge import MergeRecipe
from tests.conftest import prompt


def test_axes_are_parsed_and_checked_before_any_generation():
    assert Axis.parse("lora:outline=0, 0.5,1") == Axis("lora", ("0", "0.5", "1"), "outline")
    assert Axis.parse("prompt=a red circle, big|a blue square").values == ("a red circle, big", "a blue square")
    for text, message in (("seed", "kind=value"), ("colour=1,2", "Unknown axis"), ("cfg=3,99", "outside 1..30"),
                          ("steps=ten", "not a number"), ("seed=" + ",".join("123456789"), "1 to 8 values")):
        with pytest.raises(InvalidRequest, match=message):
            Axis.parse(text)
    request = CompareRequest(prompt("a star --seed 9"), Axis.parse("seed=1,2"), Axis.parse("cfg=3,7"))
    assert [(c, r, p.seed, p.cfg, p.n) for c, r, p, _ in cells(request)] == [
        (0, 0, 1, 3.0, 1), (1, 0, 2, 3.0, 1), (0, 1, 1, 7.0, 1), (1, 1, 2, 7.0, 1)]
    with pytest.raises(InvalidRequest, match="sweeps a merge"):
        CompareRequest(prompt("a star"), Axis.parse("alpha=0,1")).check()
    with pytest.raises(InvalidRequest, match="limit is 25"):
        CompareRequest(prompt("a star"), Axis.parse("seed=1,2,3,4,5,6"), Axis.parse("cfg=1,2,3,4,5")).check()


def _cell(grid: Image.Image, column: int, side: int = 64) -> np.ndarray:
    scale = -(-160 // side)
    box = (column * side * scale, 2 * LABEL_HEIGHT, (column + 1) * side * scale, 2 * LABEL_HEIGHT + side * scale)
    return np.asarray(grid.crop(box).resize((side, side), Image.NEAREST), dtype=np.float64)


def test_a_swept_merge_starts_at_model_a_and_ends_at_model_b(engine):
    text = "a yellow star on a blue background --seed 3 --steps 8"
    request = CompareRequest(prompt(text), Axis.parse("alpha=0,0.5,1"),
                             recipe=MergeRecipe(a="starter-shapes", b="starter-niji"))
    grid = engine.compare(request).images[0]
    assert grid.size == (3 * 192, 2 * LABEL_HEIGHT + 192)
    a = engine.imagine(ImagineRequest(prompt(text + " --n 1 --model starter-shapes"), route=False)).images[0]
    b = engine.imagine(ImagineRequest(prompt(text + " --n 1 --model starter-niji"), route=False)).images[0]
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.abs(_cell(grid, 0) - a).mean() < 0.5 and np.abs(_cell(grid, 2) - b).mean() < 0.5
    middle = _cell(grid, 1)
    assert np.abs(middle - a).mean() > 1 and np.abs(middle - b).mean() > 1
    # The engine's own models are untouched by the sweep.
    again = engine.imagine(ImagineRequest(prompt(text + " --n 1 --model starter-niji"), route=False)).images[0]
    assert np.abs(np.asarray(again, dtype=np.float64) - b).max() == 0
