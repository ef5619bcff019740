"""Procedurally drawn scenes that teach the starter models their vocabulary.

Every scene is one shape of one colour on a background of another colour, with a
size, a position and a style. The caption is generated from the same values, so
the dataset is exactly as large as we want and perfectly labelled.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

# Colours are far apart in RGB so a nearest-colour check can tell them apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.18, "medium": 0.27, "large": 0.36}  # radius as a fraction of the side
POSITIONS = {
    "center": (0.5, 0.5),
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
}
STYLES = ("flat", "gradient")
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
VOCABULARY_WORDS = sorted(
    set(PALETTE) | set(SHAPES) | set(SIZES) | set(POSITIONS) | set(STYLES)
    | {"a", "an", "on", "the", "in", "at", "of", "background", "style", "shape", "with", "and", "image", "picture"}
)


@dataclass(frozen=True)
class Scene:
    """All values that determine one drawn image."""

    shape: str
    shape_colour: str
    background_colour: str
    size: str
    position: str
    style: str
    jitter_x: float
    jitter_y: float
    rotation: float


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene with balanced colour pairs (the background never matches the shape)."""
    shape_colour, background_colour = rng.sample(list(PALETTE), 2)
    return Scene(
        shape=rng.choice(SHAPES),
        shape_colour=shape_colour,
        background_colour=background_colour,
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        style=rng.choice(STYLES),
        jitter_x=rng.uniform(-0.04, 0.04),
        jitter_y=rng.uniform(-0.04, 0.04),
        rotation=rng.uniform(-0.3, 0.3),
    )


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption in one of several phrasings; size, position and style are sometimes left out."""
    size = f"{scene.size} " if rng.random() < 0.6 else ""
    position = f" {POSITION_PHRASES[scene.position]}" if rng.random() < 0.6 else ""
    style = f", {scene.style} style" if rng.random() < 0.6 else ""
    article = "an" if (size or scene.shape_colour)[0] in "aeiou" else "a"
    templates = (
        f"{article} {size}{scene.shape_colour} {scene.shape}{position} on a {scene.background_colour} background{style}",
        f"{size}{scene.shape_colour} {scene.shape}{position}, {scene.background_colour} background{style}",
        f"{article} {size}{scene.shape_colour} {scene.shape} on a {scene.background_colour} background{position}{style}",
    )
    return rng.choice(templates)


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    if factor >= 0:
        return tuple(int(c + (255 - c) * factor) for c in colour)  # type: ignore[return-value]
    return tuple(int(c * (1 + factor)) for c in colour)  # type: ignore[return-value]


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Render a scene as an RGB image of `size` x `size` pixels (anti-aliased)."""
    side = size * supersample
    background = PALETTE[scene.background_colour]
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    if scene.style == "gradient":
        for y in range(side):
            draw.line([(0, y), (side, y)], fill=_shade(background, 0.25 - 0.5 * y / side))
    cx = (POSITIONS[scene.position][0] + scene.jitter_x) * side
    cy = (POSITIONS[scene.position][1] + scene.jitter_y) * side
    radius = SIZES[scene.size] * side
    fill = PALETTE[scene.shape_colour]
    if scene.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif scene.shape == "square":
        r = radius * 0.85
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)]
        cos, sin = math.cos(scene.rotation), math.sin(scene.rotation)
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners], fill=fill)
    elif scene.shape == "triangle":
        points = [
            (cx + radius * math.cos(scene.rotation * 0.5 + a), cy + radius * math.sin(scene.rotation * 0.5 + a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
        draw.polygon(points, fill=fill)
    else:  # star
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            a = -math.pi / 2 + k * math.pi / 5 + scene.rotation
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        draw.polygon(points, fill=fill)
    if scene.style == "gradient":
        image = image.filter(ImageFilter.GaussianBlur(radius=supersample * 0.4))
    return image.resize((size, size), Image.LANCZOS)


def nearest_colour(rgb: tuple[float, float, float]) -> str:
    """Name of the palette colour closest to `rgb` (Euclidean in RGB)."""
    return min(PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(PALETTE[name], rgb)))
