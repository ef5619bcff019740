"""X/Y comparison grids, as model makers build them by hand: one prompt, every cell with the same seed, two axes
among models, merge ratios, LoRA weights, prompts, seeds, cfg, steps and samplers, labelled in one PNG.

    model=starter-shapes,starter-niji   seed=1,2,3   cfg=3,7   steps=10,20   sampler=euler,dpmpp_2m
    lora:outline=0,0.5,1   prompt=a red circle|a blue square   alpha=0,0.25,0.5,0.75,1 (a merge recipe swept)

A swept merge is computed in memory, one ratio at a time, into a pipeline of its own: nothing is written to disk.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from threading import Event

from PIL import Image, ImageDraw, ImageFont

from dreamloom.errors import GenerationCancelled, InvalidPrompt, InvalidRequest
from engine.generation import GenerationResult, ImagineRequest, StepProgress, model_family, resolve_settings
from engine.params import LoraChoice, PromptRequest, parse_prompt
from engine.recipe import MergeRecipe

AXIS_KINDS = ("model", "alpha", "lora", "prompt", "seed", "cfg", "steps", "sampler")
MAX_VALUES = 8  # per axis
MAX_CELLS = 25  # per grid: each cell is a generation
LABEL_HEIGHT = 28
MIN_CELL = 160  # small pictures are enlarged so the labels stay readable


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: what varies (`kind`, and the LoRA for `lora`) and its values, as written."""

    kind: str
    values: tuple[str, ...]
    lora: str | None = None

    @classmethod
    def parse(cls, text: str) -> Axis:
        """`kind=v1,v2,...` (`prompt=` values are separated by `|`, so they may contain commas)."""
        name, found, values = text.partition("=")
        name = name.strip().lower()
        if not found or not values.strip():
            raise InvalidRequest(f"An axis is kind=value,value,...: got {text!r}. Kinds: {', '.join(AXIS_KINDS)} "
                                 "(lora:NAME for a LoRA's weight).")
        lora = None
        if name.startswith("lora:"):
            name, lora = "lora", name.split(":", 1)[1].strip()
            if not lora:
                raise InvalidRequest("A LoRA axis names its LoRA: lora:NAME=0,0.5,1.")
        if name not in AXIS_KINDS:
            raise InvalidRequest(f"Unknown axis {name!r}; use one of {', '.join(AXIS_KINDS)}.")
        parts = tuple(v.strip() for v in values.split("|" if name == "prompt" else ",") if v.strip())
        if not 1 <= len(parts) <= MAX_VALUES:
            raise InvalidRequest(f"An axis takes 1 to {MAX_VALUES} values; {name} has {len(parts)}.")
        axis = cls(name, parts, lora)
        for value in parts:
            axis.apply(parse_prompt("x"), value)  # numbers and sampler names are checked now, before any GPU work
        return axis

    def apply(self, prompt: PromptRequest, value: str) -> PromptRequest:
        """The cell's prompt: `prompt` with this axis at `value` (alpha is applied to the model, not the prompt)."""
        try:
            if self.kind == "model":
                return dataclasses.replace(prompt, model=value, niji=False)
            if self.kind == "seed":
                return dataclasses.replace(prompt, seed=int(value))
            if self.kind == "cfg":
                return dataclasses.replace(prompt, cfg=_bounded(float(value), 1, 30, "cfg"))
            if self.kind == "steps":
                return dataclasses.replace(prompt, steps=int(_bounded(int(value), 1, 150, "steps")))
            if self.kind == "sampler":
                return dataclasses.replace(prompt, sampler=value.lower())
            if self.kind == "lora":
                weight = _bounded(float(value), -4, 4, "LoRA weight")
                kept = tuple(choice for choice in prompt.loras if choice.name != self.lora)
                return dataclasses.replace(prompt, loras=kept + (LoraChoice(self.lora, weight),))
            if self.kind == "prompt":
                words = parse_prompt(value)
                return dataclasses.replace(prompt, prompt=words.prompt, parts=words.parts)
            _bounded(float(value), -1, 2, "alpha")
            return prompt
        except ValueError:
            raise InvalidRequest(f"{self.label()}: {value!r} is not a number.") from None

    def label(self) -> str:
        return f"lora:{self.lora}" if self.kind == "lora" else self.kind

    def to_text(self) -> str:
        return f"{self.label()}=" + ("|" if self.kind == "prompt" else ",").join(self.values)


def _bounded(value: float, low: float, high: float, name: str) -> float:
    if not low <= value <= high:
        raise InvalidRequest(f"{name} {value:g} is outside {low:g}..{high:g}.")
    return value


@dataclass(frozen=True)
class CompareRequest:
    """A grid: the base prompt (its seed, or 1, in every cell), the axes, and the merge an `alpha` axis sweeps."""

    prompt: PromptRequest
    x: Axis
    y: Axis | None = None
    recipe: MergeRecipe | None = None

    def check(self) -> None:
        axes = [axis for axis in (self.x, self.y) if axis is not None]
        if self.y is not None and self.x.label() == self.y.label():
            raise InvalidRequest(f"Both axes vary {self.x.label()}; choose two different ones.")
        cells = len(self.x.values) * (len(self.y.values) if self.y else 1)
        if cells > MAX_CELLS:
            raise InvalidRequest(f"That grid has {cells} cells; the limit is {MAX_CELLS}.")
        if any(axis.kind == "alpha" for axis in axes) and self.recipe is None:
            raise InvalidRequest("An alpha axis sweeps a merge: give a recipe (`dreamloom xy --recipe FILE`, or the "
                                 "model to merge with).")
        if any(axis.kind == "alpha" for axis in axes) and any(axis.kind == "model" for axis in axes):
            raise InvalidRequest("An alpha axis merges the recipe's models; it cannot be crossed with a model axis.")


def cells(request: CompareRequest) -> list[tuple[int, int, PromptRequest, float | None]]:
    """(column, row, the cell's prompt, its merge alpha or None) for every cell, row by row."""
    base = dataclasses.replace(request.prompt, n=1, seed=request.prompt.seed if request.prompt.seed is not None else 1)
    rows = request.y.values if request.y else ("",)
    result = []
    for row, y_value in enumerate(rows):
        for column, x_value in enumerate(request.x.values):
            prompt, alpha = base, None
            for axis, value in ((request.x, x_value), (request.y, y_value)):
                if axis is None:
                    continue
                prompt = axis.apply(prompt, value)
                if axis.kind == "alpha":
                    alpha = float(value)
            result.append((column, row, prompt, alpha))
    return result


def draw_grid(images: list[Image.Image], request: CompareRequest) -> Image.Image:
    """The labelled grid: x values across the top, y values down the left, the prompt as the title."""
    columns = len(request.x.values)
    rows = len(request.y.values) if request.y else 1
    side = max(images[0].width, images[0].height)
    scale = max(1, -(-MIN_CELL // side))
    cell_w, cell_h = images[0].width * scale, images[0].height * scale
    font = ImageFont.load_default(size=14)
    left = 0
    if request.y:
        left = min(220, 12 + max(int(font.getlength(_short(f"{request.y.label()}={v}"))) for v in request.y.values))
    top = 2 * LABEL_HEIGHT
    grid = Image.new("RGB", (left + columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), _short(request.prompt.prompt, 90), fill="black", font=font)
    for column, value in enumerate(request.x.values):
        draw.text((left + column * cell_w + 6, LABEL_HEIGHT + 6), _short(f"{request.x.label()}={value}", cell_w // 8),
                  fill="black", font=font)
    for row in range(rows):
        if request.y:
            draw.text((6, top + row * cell_h + cell_h // 2 - 8), _short(f"{request.y.label()}={request.y.values[row]}"),
                      fill="black", font=font)
        for column in range(columns):
            image = images[row * columns + column]
            resample = Image.NEAREST if scale > 1 else Image.LANCZOS
            grid.paste(image.resize((cell_w, cell_h), resample), (left + column * cell_w, top + row * cell_h))
    return grid


def _short(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def compare(engine, request: CompareRequest, on_step=None, cancel: Event | None = None) -> GenerationResult:
    """Generate every cell (the same seed) and draw the grid; one image in the result."""
    request.check()
    plan = cells(request)
    routed_prompts = []
    for _, _, prompt, _ in plan:  # every model, LoRA and sampler is checked before the first cell runs
        spec, routed = engine.plan(prompt, auto=False)
        resolve_settings(routed, spec, model_family(spec), rng=engine.rng)
        routed_prompts.append(routed)
    started = time.perf_counter()
    images, first = [], None
    sweep = _MergeSweep(engine, request.recipe) if request.recipe is not None else None
    try:
        for index, (_, _, prompt, alpha) in enumerate(plan):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("Cancelled.")
            if alpha is None:
                result = engine.imagine(ImagineRequest(prompt, route=False))
            else:
                result = sweep.imagine(routed_prompts[index], alpha)
            images.append(result.images[0])
            first = first or result
            if on_step is not None:
                on_step(StepProgress(index + 1, len(plan)))
    finally:
        if sweep is not None:
            sweep.close()
    grid = draw_grid(images, request)
    settings = dataclasses.replace(first.settings, kind="compare", width=grid.width, height=grid.height)
    return GenerationResult([grid], settings, {"inference_s": round(time.perf_counter() - started, 4)})


class _MergeSweep:
    """A pipeline of model A's, whose weights are set to the recipe's merge at each alpha (in memory)."""

    def __init__(self, engine, recipe: MergeRecipe) -> None:
        from engine.merge import plan_merge
        from engine.models import load_pipeline

        self.engine = engine
        self.recipe = recipe
        self.plan = plan_merge(recipe, engine.registry)
        source = self.plan.sources["a"]
        if not source.diffusers_names:
            raise InvalidRequest("A merge sweep reads model A from a diffusers folder (SD1.5 layout); for single files, "
                                 "write each merge with `dreamloom merge` and compare the models.")
        self.spec = source.spec
        self.pipe = load_pipeline(self.spec, engine.device, engine.dtype_for(self.spec.family), engine.cache_dir)
        self.targets = self._targets()

    def _targets(self) -> dict:
        """checkpoint key -> the pipeline's tensor it sets (looked up once, for every alpha)."""
        tensors = {}
        for component in ("unet", "vae", "text_encoder"):
            module = getattr(self.pipe, component)
            tensors[component] = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        targets = {}
        for key, (reader, inner, _) in self.plan.sources["a"].tensors.items():
            found = tensors.get(reader.path.parent.name, {}).get(inner)
            if found is not None and key in self.plan.ratios:
                targets[key] = found
        return targets

    def imagine(self, prompt: PromptRequest, alpha: float) -> GenerationResult:
        import torch

        from engine import pipelines
        from engine.cache import CacheEntry
        from engine.merge import merge_tensor, plan_merge

        plan = plan_merge(dataclasses.replace(self.recipe, alpha=alpha), self.engine.registry)
        with torch.no_grad():
            for key, tensor in self.targets.items():
                tensor.copy_(merge_tensor(plan, key).reshape(tensor.shape).to(tensor.dtype))
        family = model_family(self.spec)
        settings = resolve_settings(prompt, self.spec, family, rng=self.engine.rng)
        with self.engine.cache.lock:
            images = pipelines.text_to_image(CacheEntry(self.pipe, 0), settings)
        return GenerationResult(images, dataclasses.replace(settings, model=f"{self.spec.name}@alpha={alpha:g}"), {})

    def close(self) -> None:
        self.pipe = None


def parse_axes(x: str, y: str | None) -> tuple[Axis, Axis | None]:
    """Both axes of a grid from their text."""
    try:
        return Axis.parse(x), Axis.parse(y) if y else None
    except InvalidPrompt as error:
        raise InvalidRequest(str(error)) from None
