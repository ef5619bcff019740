"""Shared fixtures: the real starter model on CPU, offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import numpy as np
import pytest

from engine.params import parse_prompt
from engine.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def registry():
    """The project's own registry with the committed starter model."""
    return load_registry(ROOT / "models.toml")


@pytest.fixture(scope="session")
def engine(registry, tmp_path_factory):
    """One CPU engine for the whole session (the starter model loads once)."""
    from engine.service import Engine

    instance = Engine(registry, tmp_path_factory.mktemp("cache"), device="cpu")
    yield instance
    instance.close()


def pixels(image) -> np.ndarray:
    """An image as a float array in 0..255."""
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def mean_abs_diff(a, b) -> float:
    """Mean absolute pixel difference (0..255) of two same-size images."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


def prompt(text: str, **kwargs):
    """parse_prompt with a short default for CPU tests."""
    return parse_prompt(text, **kwargs)
