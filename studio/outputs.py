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


def image_pngs(result: GenerationResult, raw_prompt: str, *, source: str | None = None,
               job_id: int | None = None) -> list[bytes]:
    """Each image of a result as PNG bytes carrying its parameters (A1111 `parameters` and a `dreamloom` chunk).

    The same inputs give the same bytes, so a published command-line result and its copy in the image store are one
    file (content-addressed), and a later `vary` of the copy finds its parent by hash.
    """
    base: dict[str, Any] = {"raw_prompt": raw_prompt, "settings": result.settings.to_dict()}
    if source is not None:
        base["source"] = source
    if job_id is not None:
        base["job_id"] = job_id
    return [png_bytes(image, a1111_parameters(result.settings, seed, image.size), {**base, "seed": seed, "index": index})
            for index, (image, seed) in enumerate(zip(result.images, result.seeds), start=1)]


def write_result(result: GenerationResult, outputs_dir: Path, raw_prompt: str, source: str | None = None,
                 job_id: int | None = None) -> WrittenOutput:
    """Write each image (and a grid for several) into a new folder under `outputs_dir`."""
    slug = re.sub(r"[^a-z0-9]+", "-", result.settings.prompt.lower()).strip("-")[:40] or "image"
    folder = outputs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True, exist_ok=False)
    paths = []
    for index, data in enumerate(image_pngs(result, raw_prompt, source=source, job_id=job_id), start=1):
        path = folder / f"{result.settings.kind}-{index}.png"
        _write(path, data)
        paths.append(path)
    grid = None
    if len(result.images) > 1:
        grid = folder / "grid.png"
        picture = make_grid(result.images)
        parameters = a1111_parameters(result.settings, result.seeds[0], picture.size)
        extra = {"raw_prompt": raw_prompt, "settings": result.settings.to_dict(), "seed": result.seeds[0], "index": 0}
        _write(grid, png_bytes(picture, parameters, extra))
    return WrittenOutput(folder, paths, grid, list(result.seeds), result.settings.to_dict(), result.timings)
