"""Writing generation results to disk as PNGs that carry their parameters."""
from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.generation import GenerationResult
from engine.metadata import a1111_parameters, png_bytes
from engine.images import make_grid


@dataclass
class WrittenOutput:
    """Where a result's files went, with everything a script needs to reproduce them."""

    folder: Path
    images: list[Path]
    grid: Path | None
    seeds: list[int]
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON document for `--json`."""
        return {
            "folder": str(self.folder), "grid": str(self.grid) if self.grid else None,
            "images": [{"path": str(p), "seed": s, "index": i + 1} for i, (p, s) in enumerate(zip(self.images, self.seeds))],
            "parameters": self.settings, "timings": self.timings,
        }


def _write(path: Path, data: bytes) -> None:
    # Written under a temporary name, fsynced and renamed: a crash never leaves half a PNG.
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_result(result: GenerationResult, outputs_dir: Path, raw_prompt: str, source: str | None = None) -> WrittenOutput:
    """Write each image (and a grid for several) into a new folder under `outputs_dir`."""
    slug = re.sub(r"[^a-z0-9]+", "-", result.settings.prompt.lower()).strip("-")[:40] or "image"
    folder = outputs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True, exist_ok=False)
    base = {"raw_prompt": raw_prompt, "settings": result.settings.to_dict(), "source": source}
    paths = []
    for index, (image, seed) in enumerate(zip(result.images, result.seeds), start=1):
        path = folder / f"{result.settings.kind}-{index}.png"
        parameters = a1111_parameters(result.settings, seed, image.size)
        _write(path, png_bytes(image, parameters, {**base, "seed": seed, "index": index}))
        paths.append(path)
    grid = None
    if len(result.images) > 1:
        grid = folder / "grid.png"
        parameters = a1111_parameters(result.settings, result.seeds[0], None)
        _write(grid, png_bytes(make_grid(result.images), parameters, {**base, "seed": result.seeds[0], "index": 0}))
    return WrittenOutput(folder, paths, grid, list(result.seeds), result.settings.to_dict(), result.timings)
