"""Merge checkpoints the way model makers do, tensor by tensor.

Methods (per tensor, `r` the ratio that applies to its key):
- weighted_sum:   A + r (B - A)
- add_difference: A + r (B - C)                          (C = the model B was trained from)
- ties:           C + r ties(A - C, B - C)               (TIES-merging: trim each difference to its largest
                                                           `density` share, elect each weight's sign, average
                                                           the differences that agree)
- dare:           C + r mean(dare(A - C), dare(B - C))   (DARE: drop each difference weight with probability
                                                           1 - density, rescale the rest by 1 / density)

`r` is `alpha`, unless the key is in the text encoder (`text_encoder`), the VAE (taken whole from `vae`, A or B),
or a UNet / FLUX block with a ratio of its own: `blocks.input/middle/output` (SD1.5, SDXL: `input_blocks.N`,
`middle_block`, `output_blocks.N`; FLUX: `double` and `single`), or the full per-block list `block_weights` in the
order model makers use (SD1.5: IN00-IN11, M00, OUT00-OUT11 = 25; SDXL: IN00-IN08, M00, OUT00-OUT08 = 19; FLUX: the
double blocks, then the single blocks). LoRAs are baked into the result at their weight.

Keys follow the checkpoint's own layout (`model.diffusion_model.*`, `cond_stage_model.*`, `first_stage_model.*`);
a diffusers folder (SD1.5 and the starter models) is read in that layout too. Every tensor is read, merged and written
on its own (the output's header is known before any weight is read), so peak memory stays near the largest tensor,
not three models. Why our own code and not sd-mecha: the README, "Merging and comparing models".
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreamloom.errors import InvalidRequest, ModelLoadError
from engine.convert import text_encoder_ldm_name, unet_ldm_names, vae_ldm_names, vae_ldm_value
from engine.recipe import GROUPS, METHODS, NEEDS_C, MergeRecipe  # noqa: F401 (MergeRecipe: part of this API)
from engine.registry import LoraSpec, ModelSpec, Registry

OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_TEXT_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")


# -- the recipe ---------------------------------------------------------------------------------------------------


# -- reading checkpoints one tensor at a time ---------------------------------------------------------------------


class SafetensorsReader:
    """A `.safetensors` file read tensor by tensor with plain reads (no mmap: pages of three large files mapped at
    once would all count towards the process's memory)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ModelLoadError(f"{self.path.name} is not a safetensors file (its header is too large).")
            header = json.loads(handle.read(length))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.entries[key]["dtype"]
        if name not in _SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{self.path.name}: tensor {key} has the unsupported type {name}.")
        return _SAFETENSORS_DTYPES[name]

    def read(self, key: str) -> torch.Tensor:
        begin, end = self.entries[key]["data_offsets"]
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin)
            data = bytearray(handle.read(end - begin))
        if not data:
            return torch.empty(self.shape(key), dtype=self.dtype(key))
        return torch.frombuffer(data, dtype=self.dtype(key)).reshape(self.shape(key))


@dataclass
class CheckpointSource:
    """One model to merge, as keys in the checkpoint layout: a single file as it is, a diffusers folder renamed."""

    name: str
    spec: ModelSpec
    tensors: dict[str, tuple[SafetensorsReader, str, Callable[[torch.Tensor], torch.Tensor]]]
    diffusers_names: dict[str, str] = field(default_factory=dict)  # layout key -> diffusers key (UNet)

    @classmethod
    def open(cls, name: str, spec: ModelSpec) -> CheckpointSource:
        path = spec.path
        if not path.exists():
            raise ModelLoadError(f"Model {name!r} has no file at its registered place; `dreamloom models` lists them.")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ModelLoadError(f"{path.name}: merging reads .safetensors files (convert .ckpt files first).")
            reader = SafetensorsReader(path)
            return cls(name, spec, {key: (reader, key, _same) for key in reader.keys()})
        if spec.family not in ("sd15", "starter"):
            raise ModelLoadError(f"{name} is a {spec.family} diffusers folder; merging reads SD1.5-layout folders and "
                                 "single .safetensors files of any family (SD1.5, SDXL, FLUX).")
        tensors: dict[str, tuple[SafetensorsReader, str, Callable]] = {}
        diffusers_names = {}
        for component in ("unet", "vae", "text_encoder"):
            folder = path / component
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{name}: {component}/ holds no .safetensors weights.")
            config = json.loads((folder / "config.json").read_text())
            for file in files:
                reader = SafetensorsReader(file)
                if component == "unet":
                    names = unet_ldm_names(reader.keys(), config)
                    diffusers_names.update({new: key for key, new in names.items()})
                    tensors.update({new: (reader, key, _same) for key, new in names.items()})
                elif component == "vae":
                    names = vae_ldm_names(reader.keys(), config)
                    tensors.update({new: (reader, key, _vae_value(new)) for key, new in names.items()})
                else:
                    tensors.update({text_encoder_ldm_name(key): (reader, key, _same) for key in reader.keys()
                                    if not key.endswith("position_ids")})
        return cls(name, spec, tensors, diffusers_names)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        reader, inner, convert = self.tensors[key]
        shape = reader.shape(inner)
        return tuple(convert(torch.empty(shape, device="meta")).shape)

    def dtype(self, key: str) -> torch.dtype:
        reader, inner, _ = self.tensors[key]
        return reader.dtype(inner)

    def read(self, key: str) -> torch.Tensor:
        reader, inner, convert = self.tensors[key]
        return convert(reader.read(inner))


def _same(value: torch.Tensor) -> torch.Tensor:
    return value


def _vae_value(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda value: vae_ldm_value(name, value)


# -- the plan: which ratio every key gets -------------------------------------------------------------------------


def component_of(key: str) -> str:
    """text_encoder, vae or unet (the UNet or FLUX transformer)."""
    if key.startswith(_TEXT_PREFIXES):
        return "text_encoder"
    if key.startswith(_VAE_PREFIXES):
        return "vae"
    return "unet"


def block_of(key: str) -> tuple[str, int] | None:
    """(group, index) of a UNet / FLUX block key; None for the keys outside the blocks (time embedding, out, ...)."""
    inner = key.removeprefix("model.diffusion_model.")
    for prefix, group in (("input_blocks.", "input"), ("output_blocks.", "output"), ("double_blocks.", "double"),
                          ("single_blocks.", "single")):
        if inner.startswith(prefix):
            return group, int(inner[len(prefix):].split(".", 1)[0])
    if inner.startswith("middle_block."):
        return "middle", 0
    return None


def block_layout(keys: list[str]) -> list[tuple[str, int]]:
    """Every block of a checkpoint in model makers' order: IN.., M00, OUT.. (FLUX: double.., single..)."""
    found = {block for block in map(block_of, keys) if block is not None}
    order = {"input": 0, "middle": 1, "output": 2, "double": 0, "single": 1}
    return sorted(found, key=lambda block: (order[block[0]], block[1]))


def block_label(block: tuple[str, int]) -> str:
    group, index = block
    return {"input": f"IN{index:02d}", "middle": "M00", "output": f"OUT{index:02d}",
            "double": f"D{index:02d}", "single": f"S{index:02d}"}[group]


@dataclass
class MergePlan:
    """Sources opened and checked, and the ratio of every key: what `--dry-run` prints and `merge` runs."""

    recipe: MergeRecipe
    sources: dict[str, CheckpointSource]  # "a", "b" (and "c")
    keys: list[str]
    ratios: dict[str, float]
    vae_from: str
    loras: list[tuple[LoraSpec, float]]
    lora_targets: dict[str, list[tuple[dict[str, torch.Tensor], float]]]  # key -> [(up/down/alpha, weight)]

    def describe(self) -> list[str]:
        """One line per block (and the other parts): where its keys come from."""
        recipe, lines = self.recipe, []
        names = {label: source.name for label, source in self.sources.items()}
        formula = {"weighted_sum": "{a} + {r} x ({b} - {a})", "add_difference": "{a} + {r} x ({b} - {c})",
                   "ties": "{c} + {r} x TIES({a} - {c}, {b} - {c}; density {d})",
                   "dare": "{c} + {r} x DARE({a} - {c}, {b} - {c}; keep {d})"}[recipe.method]
        groups: dict[str, list[str]] = {}
        for key in self.keys:
            component = component_of(key)
            block = block_of(key)
            part = "VAE" if component == "vae" else "text encoder" if component == "text_encoder" else (
                block_label(block) if block else "UNet (outside the blocks)")
            groups.setdefault(part, []).append(key)
        def order(part: str) -> tuple:
            if part in ("text encoder", "UNet (outside the blocks)", "VAE"):
                return ({"text encoder": 0, "UNet (outside the blocks)": 1, "VAE": 9}[part], "")
            return ({"I": 2, "M": 3, "O": 4, "D": 2, "S": 3}.get(part[0], 5), part)

        for part, keys in sorted(groups.items(), key=lambda item: order(item[0])):
            example = keys[0]
            if part == "VAE":
                how = f"copied from {names[self.vae_from]}"
            else:
                how = formula.format(a=names["a"], b=names["b"], c=names.get("c", "?"), r=f"{self.ratios[example]:g}",
                                     d=f"{recipe.density:g}")
            lines.append(f"{part:<26} {len(keys):>5} keys  {how}   (e.g. {example})")
        for spec, weight in self.loras:
            touched = sum(1 for entries in self.lora_targets.values() for _ in entries)
            lines.append(f"LoRA {spec.name} baked in at {weight:g} ({touched} layer(s) across all LoRAs)")
        return lines


def resolve_model(name: str, registry: Registry, allow_paths: bool) -> ModelSpec:
    """A registered model, or (the owner's CLI) a checkpoint path."""
    if name in registry.models:
        return registry.models[name]
    if allow_paths:
        return registry.resolve(name)
    raise ModelLoadError(f"Unknown model {name!r}; merge registered models (`dreamloom models`).")


def plan_merge(recipe: MergeRecipe, registry: Registry, *, allow_paths: bool = False) -> MergePlan:
    """Open the models, check they can be merged (family, keys, shapes) and give every key its ratio."""
    recipe.check()
    labels = {"a": recipe.a, "b": recipe.b, **({"c": recipe.c} if recipe.method in NEEDS_C else {})}
    sources = {label: CheckpointSource.open(name, resolve_model(name, registry, allow_paths))
               for label, name in labels.items()}
    a = sources["a"]
    family = a.spec.family
    for label, source in sources.items():
        if source.spec.family != family:
            raise InvalidRequest(f"{source.name} is a {source.spec.family} model and {a.name} a {family} one; only "
                                 "models of one family merge.")
    keys = [key for key in a.keys() if a.dtype(key).is_floating_point]
    for label, source in sources.items():
        if label == "a":
            continue
        own = set(source.keys())
        for key in keys:
            if component_of(key) == "vae" and label != recipe.vae:
                continue
            if key not in own:
                raise InvalidRequest(f"{source.name} has no tensor {key} (the first key of {a.name} it lacks): "
                                     "these models have different architectures.")
            if source.shape(key) != a.shape(key):
                raise InvalidRequest(f"{key} is {list(source.shape(key))} in {source.name} but {list(a.shape(key))} "
                                     f"in {a.name}: these models have different architectures.")
    layout = block_layout(keys)
    if recipe.block_weights and len(recipe.block_weights) != len(layout):
        labels_text = ", ".join(block_label(block) for block in layout)
        raise InvalidRequest(f"block_weights has {len(recipe.block_weights)} values; {a.name} has {len(layout)} blocks "
                             f"({labels_text}).")
    present_groups = {group for group, _ in layout}
    missing = sorted(set(recipe.blocks) - present_groups)
    if missing:
        raise InvalidRequest(f"{a.name} has no {', '.join(missing)} blocks; its groups: {', '.join(sorted(present_groups))}.")
    per_block = dict(zip(layout, recipe.block_weights))
    ratios = {}
    for key in keys:
        component, block = component_of(key), block_of(key)
        if component == "text_encoder":
            ratios[key] = recipe.alpha if recipe.text_encoder is None else recipe.text_encoder
        elif component == "vae":
            ratios[key] = 0.0 if recipe.vae == "a" else 1.0
        elif block is not None and block in per_block:
            ratios[key] = per_block[block]
        elif block is not None and block[0] in recipe.blocks:
            ratios[key] = recipe.blocks[block[0]]
        else:
            ratios[key] = recipe.alpha
    loras = [(_lora_spec(name, registry, allow_paths), weight) for name, weight in recipe.loras]
    for spec, _ in loras:
        if spec.family not in (family, "unknown"):
            raise InvalidRequest(f"LoRA {spec.name} is for {spec.family} models; {a.name} is a {family} model.")
    lora_targets = _lora_targets(loras, a, set(keys))
    return MergePlan(recipe, sources, keys, ratios, recipe.vae, loras, lora_targets)


def _lora_spec(name: str, registry: Registry, allow_paths: bool) -> LoraSpec:
    if name in registry.loras:
        return registry.loras[name]
    if allow_paths and Path(name).suffix == ".safetensors" and Path(name).is_file():
        return LoraSpec(Path(name).stem, Path(name).resolve(), family="unknown")
    return registry.lora(name)  # the unknown-LoRA message lists the registered ones


# -- LoRAs baked in -----------------------------------------------------------------------------------------------


def _kohya_names(source: CheckpointSource, keys: set[str]) -> dict[str, str]:
    """kohya module name (`lora_unet_...`, `lora_te_...`) -> the checkpoint key it changes."""
    names: dict[str, str] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        stem = key[: -len(".weight")]
        if key.startswith("model.diffusion_model."):
            names["lora_unet_" + stem.removeprefix("model.diffusion_model.").replace(".", "_")] = key
            diffusers = source.diffusers_names.get(key)
            if diffusers:  # SD1.5 LoRAs name UNet modules in diffusers' layout
                names["lora_unet_" + diffusers[: -len(".weight")].replace(".", "_")] = key
        elif key.startswith("cond_stage_model.transformer."):
            names["lora_te_" + stem.removeprefix("cond_stage_model.transformer.").replace(".", "_")] = key
        elif key.startswith("conditioner.embedders.0.transformer."):
            names["lora_te1_" + stem.removeprefix("conditioner.embedders.0.transformer.").replace(".", "_")] = key
    if not source.diffusers_names and source.spec.family in ("sd15", "starter"):
        names.update(_diffusers_kohya_names(source, keys))
    return names


def _diffusers_kohya_names(source: CheckpointSource, keys: set[str]) -> dict[str, str]:
    """For an SD1.5 single file: kohya names in diffusers' UNet layout, from the model's UNet config."""
    from diffusers import UNet2DConditionModel

    config_folder = source.spec.config or Path(__file__).parent / "configs" / "sd15"
    config = json.loads((config_folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    names = unet_ldm_names(list(unet.state_dict()), config)
    return {"lora_unet_" + key[: -len(".weight")].replace(".", "_"): new for key, new in names.items()
            if key.endswith(".weight") and new in keys}


def _lora_targets(loras: list[tuple[LoraSpec, float]], source: CheckpointSource,
                  keys: set[str]) -> dict[str, list[tuple[dict[str, torch.Tensor], float]]]:
    if not loras:
        return {}
    from safetensors.torch import load_file

    kohya = _kohya_names(source, keys)
    targets: dict[str, list[tuple[dict[str, torch.Tensor], float]]] = {}
    for spec, weight in loras:
        state = load_file(str(spec.path))
        modules = sorted({key.split(".", 1)[0] for key in state})
        if not any(module.startswith("lora_") for module in modules):
            raise InvalidRequest(f"LoRA {spec.name} is not in kohya's layout (lora_unet_* / lora_te_*); merge bakes "
                                 "kohya-layout LoRAs, as A1111 and ComfyUI write them.")
        for module in modules:
            parts = {suffix: state[f"{module}.{suffix}"] for suffix in ("lora_up.weight", "lora_down.weight", "alpha")
                     if f"{module}.{suffix}" in state}
            if "lora_up.weight" not in parts or "lora_down.weight" not in parts:
                raise InvalidRequest(f"LoRA {spec.name}: {module} is not a plain LoRA layer (LoHa, LoKr and DoRA "
                                     "layers cannot be baked yet); apply it at generation instead.")
            key = kohya.get(module)
            if key is None:
                raise InvalidRequest(f"LoRA {spec.name}: no layer of {source.name} matches {module} (the first one "
                                     "that does not fit); is it for another model family?")
            targets.setdefault(key, []).append((parts, weight))
    return targets


def lora_delta(parts: dict[str, torch.Tensor], weight: float, shape: tuple[int, ...]) -> torch.Tensor:
    """weight x alpha / rank x up @ down, in the target's shape (linear, 1x1 or 3x3 convolution)."""
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else rank
    delta = up.flatten(1) @ down.flatten(1)
    return (delta * (weight * alpha / rank)).reshape(shape)


# -- merging ------------------------------------------------------------------------------------------------------


def _ties(differences: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = []
    for difference in differences:
        keep = max(1, int(round(difference.numel() * density)))
        if keep >= difference.numel():
            trimmed.append(difference)
            continue
        threshold = difference.abs().flatten().kthvalue(difference.numel() - keep + 1).values
        trimmed.append(torch.where(difference.abs() >= threshold, difference, torch.zeros_like(difference)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def _dare(differences: list[torch.Tensor], density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    kept = [difference * (torch.rand(difference.shape, generator=generator) < density) / density
            for difference in differences]
    return torch.stack(kept).mean(0)


def merge_tensor(plan: MergePlan, key: str, ratio: float | None = None) -> torch.Tensor:
    """The merged value of one key (float32), LoRAs baked in; `ratio` overrides the plan's (for sweeps)."""
    recipe, r = plan.recipe, plan.ratios[key] if ratio is None else ratio
    a = plan.sources["a"].read(key).float()
    if component_of(key) == "vae":
        merged = plan.sources[plan.vae_from].read(key).float() if plan.vae_from != "a" else a
    elif recipe.method == "weighted_sum":
        merged = a if r == 0 else a + r * (plan.sources["b"].read(key).float() - a)
    elif recipe.method == "add_difference":
        merged = a if r == 0 else a + r * (plan.sources["b"].read(key).float() - plan.sources["c"].read(key).float())
    else:
        c = plan.sources["c"].read(key).float()
        differences = [a - c, plan.sources["b"].read(key).float() - c]
        if recipe.method == "ties":
            merged = c + r * _ties(differences, recipe.density)
        else:
            merged = c + r * _dare(differences, recipe.density, recipe.seed ^ zlib.crc32(key.encode()))
    for parts, weight in plan.lora_targets.get(key, []):
        merged = merged + lora_delta(parts, weight, tuple(merged.shape))
    return merged


def merged_tensors(plan: MergePlan, ratio: Callable[[str], float | None] = lambda key: None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, merged float32 tensor), one at a time."""
    for key in plan.keys:
        yield key, merge_tensor(plan, key, ratio(key))


def write_merge(plan: MergePlan, out: Path, metadata: dict[str, str]) -> Path:
    """Stream the merge into one `.safetensors` in the checkpoint layout (A1111, ComfyUI, Forge and diffusers'
    `from_single_file` read it): the header first (every shape is known), then each tensor as it is merged."""
    dtype = OUTPUT_DTYPES[plan.recipe.dtype]
    a = plan.sources["a"]
    extras = [key for key in a.keys() if key not in plan.ratios]  # integer tensors (position ids): copied
    layout, offset = {}, 0
    for key in plan.keys + extras:
        shape = a.shape(key)
        target = dtype if key in plan.ratios else a.dtype(key)
        size = target.itemsize * math.prod(shape)
        layout[key] = {"dtype": _DTYPE_NAMES[target], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": metadata, **layout}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial")
    with open(temporary, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for key, value in merged_tensors(plan):
            handle.write(_bytes(value.to(dtype)))
        for key in extras:
            handle.write(_bytes(a.read(key)))
    temporary.replace(out)
    return out


def _bytes(value: torch.Tensor) -> bytes:
    flat = value.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def merge_metadata(plan: MergePlan, hashes, title: str) -> dict[str, str]:
    """The recipe and the parents' hashes, for the output's header (strings only, as safetensors requires)."""
    parents = {source.name: hashes.model_hash(source.spec.path) for source in plan.sources.values()}
    parents |= {f"lora:{spec.name}": hashes.lora_hash(spec.path) for spec, _ in plan.loras}
    return {"format": "pt", "modelspec.title": title, "modelspec.architecture": plan.sources["a"].spec.family,
            "dreamloom.merge_recipe": json.dumps(plan.recipe.to_dict(), sort_keys=True),
            "dreamloom.parents": json.dumps(parents, sort_keys=True)}


def output_config(plan: MergePlan) -> Path | None:
    """The diffusers config a single-file result loads with: A's folder, or A's own config (None: the family's
    shipped one)."""
    spec = plan.sources["a"].spec
    return spec.path if spec.path.is_dir() else spec.config


def write_diffusers(plan: MergePlan, out: Path, metadata: dict[str, str], cache_dir: Path) -> Path:
    """The merge as a diffusers folder: streamed to a single file first, then loaded and saved as diffusers does."""
    import shutil

    from engine.models import load_pipeline

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidRequest(f"{out.name} exists and is not empty; name a new folder.")
    single = out.with_name(f".{out.name}.single.safetensors")
    try:
        write_merge(plan, single, metadata)
        spec = ModelSpec(out.name, single, plan.sources["a"].spec.family, config=output_config(plan))
        pipe = load_pipeline(spec, "cpu", OUTPUT_DTYPES[plan.recipe.dtype], cache_dir)
        pipe.save_pretrained(out, safe_serialization=True)
        source = plan.sources["a"].spec.path
        if source.is_dir() and (source / "dreamloom.json").is_file():  # the starter's preview factors
            shutil.copy(source / "dreamloom.json", out / "dreamloom.json")
        (out / "merge.json").write_text(json.dumps({key: value for key, value in metadata.items()}, indent=1))
    finally:
        single.unlink(missing_ok=True)
    return out
