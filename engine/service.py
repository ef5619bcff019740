"""The engine's front: requests in, results out, on one worker thread, one model cache, one GPU lock."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Event

import torch

from dreamloom.errors import EngineUnavailable, InvalidImage, InvalidPrompt
from engine import pipelines
from engine.cache import ModelCache, PromptEmbeddingCache
from engine.generation import (
    UPSCALE_STRENGTH, VARIATION_STRENGTH, GenerationResult, ImagineRequest, UpscaleRequest,
    VaryRequest, model_family, resolve_settings,
)
from engine.hashes import FileHashes
from engine.models import estimate_bytes, load_pipeline, load_refiner
from engine.params import PromptRequest, check_image_weight
from engine.registry import ModelSpec, Registry
from engine.routing import route

log = logging.getLogger(__name__)
MAX_UPSCALE_SIDE = 8192
MAX_VARY_PIXELS = 2048 * 2048  # per variation (four are made): a 16 000 000 x 1 source must not allocate gigabytes


def pick_device(requested: str | None = None) -> str:
    """`requested` if given, else CUDA when available, else CPU."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(f"Device {requested!r} was asked for but no CUDA GPU is available; use cpu.")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_budget_bytes(device: str) -> int:
    """90% of GPU memory on a GPU, half of RAM on CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.9)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=64)
def _preview_factors(path: Path):
    """Latent-to-RGB preview factors a starter model stores in its dreamloom.json, if any."""
    meta = path / "dreamloom.json"
    if path.is_dir() and meta.is_file():
        factors = json.loads(meta.read_text()).get("latent_rgb_factors")
        if factors:
            return factors["weights"], factors["bias"]
    return None


def _fit(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    return tuple(max(multiple, round(side / multiple) * multiple) for side in size)  # type: ignore[return-value]


class Engine:
    """Generates images for requests; safe to call from asyncio through the `*_async` methods."""

    def __init__(self, registry: Registry, cache_dir: Path, *, device: str | None = None,
                 memory_budget_bytes: int | None = None, rng: random.Random | None = None,
                 max_loaded_loras: int = pipelines.MAX_LOADED_LORAS, embedding_cache_size: int = 256,
                 threads: int | None = None) -> None:
        self.registry = registry
        self.max_loaded_loras = max_loaded_loras
        self.cache_dir = Path(cache_dir)
        self.device = pick_device(device)
        self.rng = rng or random.SystemRandom()
        self.cache = ModelCache(
            load=lambda spec: load_pipeline(spec, self.device, self.dtype_for(spec.family), self.cache_dir),
            estimate=lambda spec: estimate_bytes(spec, self.dtype_for(spec.family)),
            budget_bytes=memory_budget_bytes or default_budget_bytes(self.device),
            release=_release_memory,
        )
        self.hashes = FileHashes(self.cache_dir / "file-hashes.json")
        self.embeddings = PromptEmbeddingCache(embedding_cache_size)
        # One worker thread: inference never blocks an event loop, and jobs never overlap on the GPU.
        # `threads` is set in that thread too: with OpenMP builds the intra-op thread count is per calling thread.
        if threads:
            torch.set_num_threads(threads)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamloom-engine",
                                          initializer=torch.set_num_threads if threads else None,
                                          initargs=(threads,) if threads else ())

    def dtype_for(self, family: str) -> torch.dtype:
        """float32 on CPU; half precision on a GPU (bfloat16 for FLUX)."""
        if self.device == "cpu":
            return torch.float32
        return torch.bfloat16 if family == "flux" else torch.float16

    # -- checks before any GPU work ------------------------------------------------------------

    def choose_model(self, prompt: PromptRequest) -> ModelSpec:
        """The model a prompt runs on (routing: explicit choice, trigger words, keywords, similarity, default)."""
        return route(self.registry, prompt).spec

    def plan(self, prompt: PromptRequest, auto: bool = True) -> tuple[ModelSpec, PromptRequest]:
        """The model and the routed prompt (LoRAs with weights, trigger words added); checks before GPU work."""
        decision = route(self.registry, prompt, auto=auto)
        return decision.spec, decision.prompt

    def _preview_factors(self, spec: ModelSpec):
        return _preview_factors(spec.path)

    def _refiner(self, entry, spec: ModelSpec):
        """The SDXL refiner of `spec`, loaded beside its base pipeline the first time a run needs it."""
        if "refiner" not in entry.derived:
            entry.derived["refiner"] = load_refiner(spec, entry.pipe, self.dtype_for(spec.family), self.cache_dir)
        return entry.derived["refiner"]

    def _fingerprints(self, spec: ModelSpec, loras) -> dict:
        """A1111's `Model hash` and `Lora hashes` for what a run uses (cached: hashed once per file)."""
        lora_hashes = tuple((choice.name, self.hashes.lora_hash(self.registry.lora(choice.name).path))
                            for choice in loras if self.registry.lora(choice.name).path.is_file())
        return {"model_hash": self.hashes.model_hash(spec.path) if spec.path.exists() else "", "lora_hashes": lora_hashes}

    def _run(self, spec: ModelSpec, work, loras=()):
        started = time.perf_counter()
        try:
            with self.cache.acquire(spec) as entry:
                pipelines.activate_loras(entry, loras, self.registry, self.max_loaded_loras)
                entry.embeddings = self.embeddings.scope(spec.key)
                loaded = time.perf_counter()
                images = work(entry)
        except torch.cuda.OutOfMemoryError:
            _release_memory()
            raise EngineUnavailable("The GPU ran out of memory; try fewer images (--n 1), a smaller --ar or --q .5.") from None
        except RuntimeError as error:
            if "CUDA" in str(error) or "cuDNN" in str(error):
                _release_memory()
                log.exception("GPU failure")
                raise EngineUnavailable("The GPU failed while generating; the job can be retried.") from None
            raise
        return images, {"load_s": round(loaded - started, 4), "inference_s": round(time.perf_counter() - loaded, 4)}

    # -- the three operations ------------------------------------------------------------------

    def imagine(self, request: ImagineRequest, on_step=None, cancel: Event | None = None) -> GenerationResult:
        """A grid of `request.prompt.n` images from text (and an optional image prompt)."""
        check_image_weight(request.prompt, request.init_image is not None)
        spec, prompt = self.plan(request.prompt, request.route)
        family = model_family(spec)
        strength = None
        if request.init_image is not None and request.prompt.image_weight > 0:
            strength = max(0.05, min(1.0, 1.0 - 0.25 * request.prompt.image_weight))
        settings = resolve_settings(prompt, spec, family, strength=strength, rng=self.rng, kind="imagine",
                                    **self._fingerprints(spec, prompt.loras))
        factors = self._preview_factors(spec)
        if strength is not None:
            work = lambda entry: pipelines.image_to_image(entry, request.init_image, settings, on_step, cancel, factors)
        else:
            work = lambda entry: pipelines.text_to_image(entry, settings, on_step, cancel, factors,
                                                         refiner=self._refiner(entry, spec) if settings.refiner else None)
        images, timings = self._run(spec, work, prompt.loras)
        return GenerationResult(images, settings, timings)

    def vary(self, request: VaryRequest, on_step=None, cancel: Event | None = None) -> GenerationResult:
        """`prompt.n` variations of `request.source`, subtle or strong."""
        if request.strength not in VARIATION_STRENGTH:
            raise InvalidPrompt(f"Variation strength must be one of {', '.join(VARIATION_STRENGTH)}.")
        spec, prompt = self.plan(request.prompt, request.route)
        family = model_family(spec)
        size = _fit(request.source.size, family.multiple)
        if size[0] * size[1] > MAX_VARY_PIXELS or max(size) > MAX_UPSCALE_SIDE:
            raise InvalidImage(f"Variations of a {request.source.width}x{request.source.height} image would be "
                               f"{size[0]}x{size[1]}; the limit is {MAX_VARY_PIXELS:,} pixels and {MAX_UPSCALE_SIDE} a "
                               "side. Downscale it first.")
        settings = resolve_settings(prompt, spec, family, size=size, rng=self.rng,
                                    strength=VARIATION_STRENGTH[request.strength], kind=f"vary-{request.strength}",
                                    **self._fingerprints(spec, prompt.loras))
        factors = self._preview_factors(spec)
        images, timings = self._run(
            spec, lambda entry: pipelines.image_to_image(entry, request.source, settings, on_step, cancel, factors),
            prompt.loras)
        return GenerationResult(images, settings, timings)

    def upscale(self, request: UpscaleRequest, on_step=None, cancel: Event | None = None) -> GenerationResult:
        """A 2x upscale of `request.source` with a detail pass (tiled for large images)."""
        spec, prompt = self.plan(request.prompt, request.route)
        family = model_family(spec)
        width, height = _fit((request.source.width * 2, request.source.height * 2), family.multiple)
        if max(width, height) > MAX_UPSCALE_SIDE:
            raise InvalidImage(f"Upscaling would make a {width}x{height} image; the limit is {MAX_UPSCALE_SIDE} pixels a side.")
        prompt = dataclasses.replace(prompt, n=1)
        settings = resolve_settings(prompt, spec, family, size=(width, height), rng=self.rng,
                                    strength=UPSCALE_STRENGTH[request.mode], kind=f"upscale-{request.mode}",
                                    **self._fingerprints(spec, prompt.loras))
        tile = family.native_side * 2
        overlap = max(family.multiple, (tile // 8) // family.multiple * family.multiple)
        factors = self._preview_factors(spec)
        image, timings = self._run(
            spec, lambda entry: pipelines.upscale(entry, request.source, settings, tile, overlap, family.multiple,
                                                  on_step, cancel, factors),
            prompt.loras)
        return GenerationResult([image], settings, timings)

    def memory_mb(self) -> float:
        """GPU memory allocated on a GPU; on a CPU, the process's resident memory."""
        if self.device.startswith("cuda"):
            return round(torch.cuda.memory_allocated(self.device) / 2**20, 1)
        try:
            with open("/proc/self/statm") as handle:
                return round(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
        except (OSError, ValueError, IndexError):
            return 0.0

    def compare(self, request, on_step=None, cancel: Event | None = None) -> GenerationResult:
        """An X/Y comparison grid (engine/compare.py): one labelled image, every cell with the same seed."""
        from engine.compare import compare

        return compare(self, request, on_step, cancel)

    # -- asyncio callers -----------------------------------------------------------------------

    async def _async(self, method, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(method, *args, **kwargs))

    async def call_async(self, work, *args, **kwargs):
        """Run other blocking GPU work (a slice of training) on the engine's thread: it takes turns with
        generations and never overlaps them."""
        return await self._async(work, *args, **kwargs)

    async def imagine_async(self, request: ImagineRequest, on_step=None, cancel: Event | None = None) -> GenerationResult:
        """`imagine` on the engine's worker thread."""
        return await self._async(self.imagine, request, on_step, cancel)

    async def vary_async(self, request: VaryRequest, on_step=None, cancel: Event | None = None) -> GenerationResult:
        """`vary` on the engine's worker thread."""
        return await self._async(self.vary, request, on_step, cancel)

    async def compare_async(self, request, on_step=None, cancel: Event | None = None) -> GenerationResult:
        return await self._async(self.compare, request, on_step, cancel)

    async def upscale_async(self, request: UpscaleRequest, on_step=None, cancel: Event | None = None) -> GenerationResult:
        """`upscale` on the engine's worker thread."""
        return await self._async(self.upscale, request, on_step, cancel)

    def close(self) -> None:
        """Stop the worker thread and unload models."""
        self._worker.shutdown(wait=True)
        self.cache.clear()
