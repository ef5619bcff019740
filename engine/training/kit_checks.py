"""Does each starter-kit LoRA (and the niji model) do what its description promises? Measured against the plain
starter model on the same prompts and seeds.

    .venv/bin/python -m engine.training.kit_checks [--prompts 12] [--only outline night niji]

- outline: the share of dark pixels in the outer band of the shape (its contour) rises by a clear factor;
- night: mean brightness falls by at least 30%, while the colours the prompt named still read right once the
  picture's exposure is matched to the plain one's (a darker scene, not other colours);
- niji: the share of pastel pixels (light and softly saturated, HSV) rises, and mean saturation falls.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from engine.generation import ImagineRequest
from engine.params import parse_prompt
from engine.training.evaluate_starter import colour_check, evaluation_prompts

ROOT = Path(__file__).resolve().parents[2]
# What each check must reach (the tests assert these; the README quotes them).
OUTLINE_MIN_FACTOR = 3.0
OUTLINE_MIN_SHARE = 0.25
NIGHT_MIN_DARKENING = 0.30
NIGHT_MIN_ADHERENCE = 0.95
NIJI_MIN_FACTOR = 2.0


def _prompts(count: int, avoid_dark: bool) -> list[tuple[str, str, str]]:
    rows = evaluation_prompts(count * 3)
    if avoid_dark:  # a black shape or background has no dark contour to find
        rows = [r for r in rows if "black" not in (r[1], r[2])]
    return rows[:count]


def _pairs(engine, suffix: str, count: int, avoid_dark: bool = False, steps: int = 20):
    """(plain image, styled image, shape colour, background colour) on the same prompts and seeds."""
    for index, (text, shape_colour, background_colour) in enumerate(_prompts(count, avoid_dark)):
        tail = f" --seed {7000 + index * 10} --n 2 --steps {steps}"
        plain = engine.imagine(ImagineRequest(parse_prompt(text + tail)))
        styled = engine.imagine(ImagineRequest(parse_prompt(text + suffix + tail)))
        for a, b in zip(plain.images, styled.images):
            yield a, b, shape_colour, background_colour


def _luma(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def contour_dark_share(image: Image.Image) -> float:
    """The share of dark pixels (luma < 50) in the outer band of the shape: the pixels that differ from their row's
    background, less the same region shrunk by 3 pixels."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    edges = np.concatenate([array[:, :2], array[:, -2:]], axis=1)
    row_background = np.median(edges, axis=1, keepdims=True)
    mask = np.sqrt(((array - row_background) ** 2).sum(-1)) > 60
    if mask.sum() < 0.01 * mask.size:
        return 0.0
    mask_image = Image.fromarray((mask * 255).astype(np.uint8))
    inner = np.asarray(mask_image.filter(ImageFilter.MinFilter(7))) > 0
    band = mask & ~inner
    if not band.any():
        return 0.0
    return float((_luma(image)[band] < 50).mean())


def exposure_matched(plain: Image.Image, styled: Image.Image) -> Image.Image:
    """`styled` brightened (or darkened) to the plain picture's mean brightness: a night scene's red is then red
    again, while a picture whose colours changed stays changed."""
    gain = _luma(plain).mean() / max(_luma(styled).mean(), 1.0)
    return Image.fromarray(np.clip(np.asarray(styled.convert("RGB"), dtype=np.float64) * gain, 0, 255).astype(np.uint8))


def pastel_share(image: Image.Image) -> tuple[float, float]:
    """(share of pastel pixels: HSV value >= 0.75 and saturation 0.1-0.6, mean saturation)."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64) / 255.0
    saturation, value = hsv[..., 1], hsv[..., 2]
    pastel = (value >= 0.75) & (saturation >= 0.1) & (saturation <= 0.6)
    return float(pastel.mean()), float(saturation.mean())


def check_outline(engine, count: int) -> dict:
    plain, styled = [], []
    for a, b, _, _ in _pairs(engine, " --lora outline", count, avoid_dark=True):
        plain.append(contour_dark_share(a))
        styled.append(contour_dark_share(b))
    base, lora = float(np.mean(plain)), float(np.mean(styled))
    factor = lora / max(base, 1e-3)
    return {"check": "outline", "images": len(plain), "contour_dark_plain": round(base, 4),
            "contour_dark_lora": round(lora, 4), "factor": round(factor, 2),
            "passed": factor >= OUTLINE_MIN_FACTOR and lora >= OUTLINE_MIN_SHARE}


def check_night(engine, count: int) -> dict:
    plain_mean, night_mean, right = [], [], []
    for a, b, shape_colour, background_colour in _pairs(engine, " --lora night", count):
        plain_mean.append(_luma(a).mean())
        night_mean.append(_luma(b).mean())
        shape_right, background_right = colour_check(exposure_matched(a, b), shape_colour, background_colour)
        right.append(shape_right and background_right)
    darkening = 1 - float(np.mean(night_mean)) / float(np.mean(plain_mean))
    adherence = float(np.mean(right))
    return {"check": "night", "images": len(right), "brightness_plain": round(float(np.mean(plain_mean)), 1),
            "brightness_lora": round(float(np.mean(night_mean)), 1), "darkening": round(darkening, 3),
            "colour_adherence": round(adherence, 3),
            "passed": darkening >= NIGHT_MIN_DARKENING and adherence >= NIGHT_MIN_ADHERENCE}


def check_niji(engine, count: int) -> dict:
    shares, saturations = {"plain": [], "niji": []}, {"plain": [], "niji": []}
    for a, b, _, _ in _pairs(engine, " --model starter-niji", count):
        for key, image in (("plain", a), ("niji", b)):
            share, saturation = pastel_share(image)
            shares[key].append(share)
            saturations[key].append(saturation)
    base, niji = float(np.mean(shares["plain"])), float(np.mean(shares["niji"]))
    factor = niji / max(base, 1e-3)
    sat_plain, sat_niji = float(np.mean(saturations["plain"])), float(np.mean(saturations["niji"]))
    return {"check": "niji", "images": len(shares["plain"]), "pastel_plain": round(base, 4), "pastel_niji": round(niji, 4),
            "factor": round(factor, 2), "saturation_plain": round(sat_plain, 3), "saturation_niji": round(sat_niji, 3),
            "passed": factor >= NIJI_MIN_FACTOR and sat_niji < sat_plain}


CHECKS = {"outline": check_outline, "night": check_night, "niji": check_niji}


def starter_engine(cache_dir: Path):
    """An engine on the repository's starter registry (models.toml at the root)."""
    from engine.registry import load_registry
    from engine.service import Engine

    return Engine(load_registry(ROOT / "models" / "models.toml"), cache_dir, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--only", nargs="*", default=list(CHECKS))
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"))
    args = parser.parse_args()
    engine = starter_engine(args.cache_dir)
    for name in args.only:
        print(json.dumps(CHECKS[name](engine, args.prompts)), flush=True)


if __name__ == "__main__":
    main()
