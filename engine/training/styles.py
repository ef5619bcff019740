"""Styled versions of the starter scenes: the datasets of the starter kit's LoRAs and its niji model."""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from engine.training.scenes import Scene, caption, random_scene, render

STYLES = ("outline", "night", "pastel")
NIGHT_LIGHT = 0.5  # the share of the light a night scene keeps


def _shape_mask(scene: Scene, size: int) -> Image.Image:
    """White where the shape is: the scene drawn white on black."""
    mask_scene = Scene(**{**scene.__dict__, "shape_colour": "white", "background_colour": "black", "style": "flat"})
    return render(mask_scene, size).convert("L").point(lambda v: 255 if v > 128 else 0)


def render_styled(scene: Scene, style: str, size: int = 64) -> Image.Image:
    """The scene in one of the kit's styles.

    outline: a bold black contour around the shape (3 px outside it, 1 px inside, at 64 px: thinner contours do not
    survive the starter VAE); night: the same colours at half the light, with a few white stars (a darker scene,
    not other colours); pastel: colours blended towards white, with a soft white contour (the niji model's look).
    """
    image = render(scene, size)
    if style == "outline":
        mask = _shape_mask(scene, size)
        band = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(7)), mask.filter(ImageFilter.MinFilter(3)))
        image.paste((0, 0, 0), mask=band)
        return image
    if style == "night":
        dark = Image.eval(image, lambda v: int(v * NIGHT_LIGHT))
        draw = ImageDraw.Draw(dark)
        rng = random.Random(zlib.crc32(repr(scene).encode()))  # hash() of a str differs per process
        for _ in range(6):
            x, y = rng.randrange(size), rng.randrange(size)
            draw.point((x, y), fill=(255, 255, 230))
        return dark
    if style == "pastel":
        pale = Image.blend(image, Image.new("RGB", image.size, (255, 255, 255)), 0.45)
        mask = _shape_mask(scene, size)
        band = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(3)), mask)
        pale.paste((255, 255, 255), mask=band)
        return pale
    raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")


def write_style_dataset(folder: Path, style: str, count: int, seed: int = 0) -> Path:
    """An imagefolder dataset (`metadata.jsonl` + PNGs) of `count` scenes in `style`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for index in range(count):
            scene = random_scene(rng)
            name = f"{style}-{index:05d}.png"
            render_styled(scene, style).save(folder / name)
            metadata.write(json.dumps({"file_name": name, "text": caption(scene, rng)}) + "\n")
    return folder
