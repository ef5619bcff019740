"""A merge recipe (`dreamloom merge recipe.toml`): what to merge and how, checked before any weight is read.
Torch-free, so front doors can check a recipe without loading the engine; engine/merge.py runs it."""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dreamloom.errors import InvalidRequest

METHODS = ("weighted_sum", "add_difference", "ties", "dare")
NEEDS_C = {"add_difference", "ties", "dare"}
GROUPS = {"unet": ("input", "middle", "output"), "flux": ("double", "single")}
DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class MergeRecipe:
    """What to merge and how; read from a TOML file (`dreamloom merge recipe.toml`) or built from flags."""

    a: str
    b: str
    method: str = "weighted_sum"
    c: str | None = None
    alpha: float = 0.5
    text_encoder: float | None = None  # the text encoder's own ratio (default: alpha)
    vae: str = "a"  # whose VAE the result keeps: "a" or "b"
    blocks: dict[str, float] = field(default_factory=dict)  # group ratios: input / middle / output (FLUX: double / single)
    block_weights: tuple[float, ...] = ()  # the full per-block list
    loras: tuple[tuple[str, float], ...] = ()  # (name or path, weight), baked into the result
    density: float = 0.2  # ties: the share of each difference kept; dare: the keep probability
    seed: int = 0  # dare's random drops
    dtype: str = "fp16"

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> MergeRecipe:
        """A recipe from a parsed TOML document, checked; errors name the field."""
        known = {f for f in cls.__dataclass_fields__} | {"lora"}
        unknown = sorted(set(document) - known)
        if unknown:
            raise InvalidRequest(f"Unknown merge recipe field(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        values = dict(document)
        loras = values.pop("loras", values.pop("lora", []))
        try:
            values["loras"] = tuple((str(entry["name"]), float(entry.get("weight", 1.0))) for entry in loras)
        except (TypeError, KeyError, ValueError):
            raise InvalidRequest("`loras` is a list of tables: [[loras]] name = \"...\" weight = 0.8") from None
        if "block_weights" in values:
            values["block_weights"] = tuple(float(value) for value in values["block_weights"])
        recipe = cls(**values)
        recipe.check()
        return recipe

    @classmethod
    def from_toml(cls, path: Path) -> MergeRecipe:
        return cls.from_dict(read_recipe_file(path))

    def check(self) -> None:
        """Concise errors before any weight is read."""
        if self.method not in METHODS:
            raise InvalidRequest(f"Unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.method in NEEDS_C and not self.c:
            raise InvalidRequest(f"{self.method} needs a third model `c` (the base the others were trained from).")
        for name, value in (("alpha", self.alpha), ("text_encoder", self.text_encoder), *self.blocks.items(),
                            *((f"block_weights[{i}]", v) for i, v in enumerate(self.block_weights))):
            if value is not None and not -1.0 <= float(value) <= 2.0:
                raise InvalidRequest(f"{name} = {value} is outside -1..2.")
        bad = sorted(set(self.blocks) - {*GROUPS["unet"], *GROUPS["flux"]})
        if bad:
            raise InvalidRequest(f"Unknown block group(s) {', '.join(bad)}; use input, middle, output (FLUX: double, single).")
        if self.vae not in ("a", "b"):
            raise InvalidRequest("vae is \"a\" or \"b\": the model whose VAE the result keeps.")
        if not 0.0 < self.density <= 1.0:
            raise InvalidRequest("density is in (0, 1]: the share of each difference TIES keeps or DARE does not drop.")
        if self.dtype not in DTYPES:
            raise InvalidRequest(f"dtype is one of {', '.join(DTYPES)}.")
        for name, weight in self.loras:
            if not -4.0 <= weight <= 4.0:
                raise InvalidRequest(f"LoRA {name}: weight {weight} is outside -4..4.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [{"name": name, "weight": weight} for name, weight in self.loras]
        data["block_weights"] = list(self.block_weights)
        return data


def read_recipe_file(path: Path) -> dict[str, Any]:
    """A recipe file's fields, unchecked (the CLI lays its flags over them); errors say what is wrong with it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise InvalidRequest(f"{Path(path).name} is not valid TOML: {error}") from None
    except OSError as error:
        raise InvalidRequest(f"Cannot read the merge recipe {Path(path).name}: {error.strerror}.") from None
