"""The generation scripts: text-to-image grids, variations and upscales on a loaded pipeline.

Each function reads as a numbered script over plain diffusers calls; the little
duplication between them is deliberate.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from threading import Event

import numpy as np
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from dreamloom.errors import GenerationCancelled, ModelLoadError, UnknownModel
from engine.attention import has_emphasis, parse_emphasis
from engine.cache import CacheEntry, ScopedEmbeddings
from engine.generation import GenerationSettings, StepProgress
from engine.images import make_grid

ProgressCallback = Callable[[StepProgress], None]


class _DropNotices(logging.Filter):
    """Drops library log lines that mean nothing to a Dreamloom user."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# A LoRA without text-encoder layers is normal (diffusers warns on every load of one), and several named adapters on
# one model are how LoRAs are switched here (peft warns about that).
for _logger in ("diffusers.loaders.peft", "diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline"):
    logging.getLogger(_logger).addFilter(_DropNotices("No LoRA keys associated to"))
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)

# Linear latent -> RGB maps for cheap previews (the approximation A1111 and ComfyUI use).
LATENT_RGB_FACTORS = {
    "sd15": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
             [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
             [0.1084, -0.0175, -0.0011]),
}


def make_scheduler(sampler: str, config):
    """The diffusers scheduler for a sampler name of the prompt syntax."""
    if sampler == "euler" and config.get("_class_name", "").startswith("FlowMatch"):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    factories = {
        "euler": lambda: EulerDiscreteScheduler.from_config(config),
        "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(config),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=False),
        "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=True),
        "ddim": lambda: DDIMScheduler.from_config(config),
        "unipc": lambda: UniPCMultistepScheduler.from_config(config),
        "lcm": lambda: LCMScheduler.from_config(config),
    }
    return _keeping_x0(factories[sampler]())


def _keeping_x0(scheduler):
    """Let the scheduler remember its last estimate of the finished latents (Euler, Euler a, DDIM and LCM compute it
    in `step` and hand it back beside the next latents), so a step's preview can show where the run is heading."""
    step = scheduler.step

    def step_keeping_x0(*args, **kwargs):
        output = step(*args, **kwargs)
        estimate = output[1] if isinstance(output, tuple) and len(output) > 1 else \
            getattr(output, "pred_original_sample", None) or getattr(output, "denoised", None)
        scheduler.__dict__["last_x0"] = estimate if isinstance(estimate, torch.Tensor) else None
        return output

    scheduler.step = step_keeping_x0
    return scheduler


def latents_preview(latents: torch.Tensor, family: str, factors=None) -> Image.Image | None:
    """A low-resolution RGB grid straight from latents, without running the VAE."""
    factors = factors or LATENT_RGB_FACTORS.get(family)
    if factors is None or latents.ndim != 4 or latents.shape[1] != len(factors[0]):
        return None
    weights = torch.tensor(factors[0], dtype=torch.float32)
    bias = torch.tensor(factors[1], dtype=torch.float32)
    rgb = torch.einsum("nchw,cr->nhwr", latents.detach().float().cpu(), weights) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    return make_grid([Image.fromarray(p) for p in pixels])


@contextlib.contextmanager
def seamless_tiling(*modules: torch.nn.Module) -> Iterator[None]:
    """Circular padding on every convolution: the image wraps around its edges (--tile)."""
    convolutions = [m for module in modules if module is not None for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    previous = [c.padding_mode for c in convolutions]
    for conv in convolutions:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in zip(convolutions, previous):
            conv.padding_mode = mode


SMALL_VAE_PARAMETERS = 5_000_000  # a VAE this small decodes a preview in milliseconds (the starter's: ~1.6M)


def _predicted_final(scheduler, latents: torch.Tensor) -> torch.Tensor:
    """The scheduler's estimate of the finished latents, where it keeps one; else the current noisy latents.

    Euler, Euler a, DDIM and LCM hand it back from `step` (kept by `_keeping_x0`); DPM++ (dpmsolver++) and UniPC
    (predict_x0) keep their last x0 prediction in `model_outputs`. A preview from it shows the picture the run is
    heading for from the first steps, instead of noise until the last ones.
    """
    last = scheduler.__dict__.get("last_x0")
    if last is not None and last.shape == latents.shape:
        return last
    keeps_x0 = getattr(scheduler.config, "algorithm_type", "") in ("dpmsolver++", "sde-dpmsolver++") or \
        getattr(scheduler.config, "predict_x0", False) is True
    outputs = getattr(scheduler, "model_outputs", None)
    if keeps_x0 and outputs and outputs[-1] is not None and outputs[-1].shape == latents.shape:
        return outputs[-1]
    return latents


def _is_small_vae(vae) -> bool:
    if vae is None or getattr(vae.config, "latent_channels", None) != 4:
        return False
    if "_dreamloom_parameters" not in vae.__dict__:
        vae.__dict__["_dreamloom_parameters"] = sum(p.numel() for p in vae.parameters())
    return vae.__dict__["_dreamloom_parameters"] <= SMALL_VAE_PARAMETERS


@torch.no_grad()
def vae_preview(vae, latents: torch.Tensor) -> Image.Image:
    """A preview decoded by the model's own VAE: exact colours (used where the VAE is small enough)."""
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    pixels = vae.decode(latents).sample.float().clamp(-1, 1)
    pixels = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return make_grid([Image.fromarray(p) for p in pixels])


def preview_image(pipe, latents: torch.Tensor, family: str, factors=None) -> Image.Image | None:
    """A step's preview: the predicted final latents, decoded by a small VAE, else mapped by linear factors."""
    latents = _predicted_final(pipe.scheduler, latents)
    vae = getattr(pipe, "vae", None)
    if _is_small_vae(vae) and latents.ndim == 4:
        return vae_preview(vae, latents)
    return latents_preview(latents, family, factors)


def _step_callback(settings: GenerationSettings, total: int, on_step, cancel: Event | None, factors, offset: int = 0):
    def callback(pipe, step, timestep, tensors):
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("The job was cancelled.")
        if on_step is not None:
            latents = tensors["latents"]
            on_step(StepProgress(offset + step + 1, total, lambda: preview_image(pipe, latents, settings.family, factors)))
        return tensors

    return callback


def _generators(device: str, seeds: tuple[int, ...]) -> list[torch.Generator]:
    # CPU generators make the same seed give the same image on any device.
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _chaos(embeds: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """Repeat embeddings per image; --chaos perturbs each image's conditioning differently."""
    batch = embeds.repeat(len(settings.seeds), *([1] * (embeds.ndim - 1)))
    if settings.chaos == 0:
        return batch
    scale = settings.chaos / 100 * 0.6 * embeds.float().std()
    noise = torch.stack([
        torch.randn(embeds.shape[1:], generator=torch.Generator("cpu").manual_seed(seed ^ 0x5EED)) for seed in settings.seeds
    ]).to(batch.device, batch.dtype)
    return batch + noise * scale.to(batch.dtype)


def encode_prompt(pipe, settings: GenerationSettings, embeddings: ScopedEmbeddings | None = None,
                  encoder: str = "base") -> dict:
    """Prompt embeddings for the pipeline's family, with multi-prompt weights and chaos applied; reused from
    `embeddings` (the prompt-embedding cache, per model) when the same text was encoded before."""
    key = (encoder, settings.family, settings.clip_skip, tuple((p.text, p.weight) for p in settings.parts),
           settings.negative_prompt, settings.loras, settings.lora_hashes, pipe.device.type)
    cached = embeddings.get(key) if embeddings is not None else None
    if cached is not None:
        conditioning = {name: value.to(pipe.device) if torch.is_tensor(value) else value for name, value in cached.items()}
    else:
        started = time.perf_counter()
        conditioning = _encode_prompt(pipe, settings)
        if embeddings is not None:
            # Kept in RAM, not GPU memory: a FLUX prompt's T5 states are megabytes each.
            embeddings.put(key, {name: value.to("cpu") if torch.is_tensor(value) else value
                                 for name, value in conditioning.items()}, time.perf_counter() - started)
    # --chaos depends on the seeds, so it is applied after the cache.
    return {name: _chaos(value, settings) if name.endswith("_embeds") else value for name, value in conditioning.items()}


def _encode_prompt(pipe, settings: GenerationSettings) -> dict:
    """Prompt embeddings for the pipeline's family, with multi-prompt weights applied (one row each; no chaos).

    SD1.5 and SDXL prompts that use A1111 emphasis (`(word:1.2)`, `[word]`, BREAK), that are longer than the text
    encoder's window, or whose model sets a clip skip are encoded in chunks as A1111 and ComfyUI do (`chunked_embeddings`); the rest take diffusers'
    own `encode_prompt`, which gives the same numbers for them.
    """
    texts = [p.text for p in settings.parts] or [""]
    weights = torch.tensor([p.weight for p in settings.parts] or [1.0], device=pipe.device)
    weights = (weights / weights.sum()).view(-1, *([1] * 2))
    negative = settings.negative_prompt or None
    if settings.family == "flux":
        # FLUX reads plain text (T5 takes 512 tokens): emphasis brackets are dropped rather than read literally.
        texts = [_plain(text) for text in texts]
        negative = _plain(negative) if negative else None
        embeds, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=pipe.device, num_images_per_prompt=1)
        kwargs = {"prompt_embeds": (embeds * weights.to(embeds.dtype)).sum(0, keepdim=True),
                  "pooled_prompt_embeds": (pooled * weights[:, :, 0].to(pooled.dtype)).sum(0, keepdim=True)}
        if negative:
            neg, neg_pooled, _ = pipe.encode_prompt(prompt=[negative], prompt_2=None, device=pipe.device, num_images_per_prompt=1)
            kwargs.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled,
                          true_cfg_scale=4.0)
        return kwargs
    # Clip skip too: diffusers' encode_prompt skips layers for the prompt but not for the negative prompt; A1111 and
    # the chunked encoder skip them for both.
    if settings.clip_skip > 1 or needs_chunking(pipe, texts + [settings.negative_prompt]):
        return _chunked_conditioning(pipe, settings, texts, weights)
    if settings.family == "sdxl":
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=texts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=[negative] * len(texts) if negative else None,
        )
        return {
            "prompt_embeds": (embeds * weights.to(embeds.dtype)).sum(0, keepdim=True),
            "pooled_prompt_embeds": (pooled * weights[:, :, 0].to(pooled.dtype)).sum(0, keepdim=True),
            "negative_prompt_embeds": neg[:1],
            "negative_pooled_prompt_embeds": neg_pooled[:1],
        }
    embeds, neg = pipe.encode_prompt(
        texts, pipe.device, 1, True, negative_prompt=[settings.negative_prompt] * len(texts)
    )
    return {
        "prompt_embeds": (embeds * weights.to(embeds.dtype)).sum(0, keepdim=True),
        "negative_prompt_embeds": neg[:1],
    }



def _plain(text: str) -> str:
    return "".join(segment for segment, weight in parse_emphasis(text) if weight != -1).strip() if has_emphasis(text) else text


def _tokenizers_and_encoders(pipe) -> list[tuple]:
    """The (tokenizer, text encoder) pairs a pipeline has: an SDXL refiner has only the second."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)] if getattr(pipe, "text_encoder", None) is not None else []
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def needs_chunking(pipe, texts: list[str]) -> bool:
    """Whether any text uses A1111 emphasis or is longer than the text encoder's window."""
    tokenizer = _tokenizers_and_encoders(pipe)[0][0]
    window = tokenizer.model_max_length - 2
    return any(has_emphasis(text) for text in texts) or \
        any(len(tokenizer(text, add_special_tokens=False).input_ids) > window for text in texts if text)


COMMA_BACKTRACK = 20  # a full chunk ends after its last comma if that is at most this many tokens back (A1111)


def _chunks(pipe, tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """Token ids and weights in chunks of the encoder's window (75 for CLIP): a chunk that fills up ends after
    its last comma when one is near, and BREAK ends one early, as in A1111."""
    size = tokenizer.model_max_length - 2
    comma = tokenizer.convert_tokens_to_ids(",</w>") if ",</w>" in tokenizer.get_vocab() else None
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for segment, weight in parse_emphasis(text):
        if weight == -1:  # BREAK
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector textual-inversion tokens
            segment = pipe.maybe_convert_prompt(segment, tokenizer)
        for token in tokenizer(segment, add_special_tokens=False).input_ids:
            if len(ids) == size:
                if last_comma >= 0 and size - last_comma <= COMMA_BACKTRACK:
                    keep = last_comma + 1
                    chunks.append((ids[:keep], weights[:keep]))
                    ids, weights = ids[keep:], weights[keep:]
                else:
                    chunks.append((ids, weights))
                    ids, weights = [], []
                last_comma = -1
            if token == comma:
                last_comma = len(ids)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def _encode_chunk(pipe, tokenizer, encoder, ids: list[int], sdxl: bool, clip_skip: int = 1):
    """One chunk as diffusers' `encode_prompt` encodes a prompt: BOS, tokens, EOS, padding to the window; the
    layer read follows A1111's Clip skip."""
    length = tokenizer.model_max_length
    tokens = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    tokens += [tokenizer.pad_token_id] * (length - len(tokens))
    output = encoder(torch.tensor([tokens], device=pipe.device), output_hidden_states=sdxl or clip_skip > 1)
    if sdxl:  # SDXL reads the penultimate layer (and earlier with clip skip), no final norm; pooled from encoder 2
        return output.hidden_states[-(clip_skip + 1)], output[0]
    if clip_skip > 1:
        # transformers 5 keeps the final norm on the model itself; 4.x kept it under `text_model`
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return norm(output.hidden_states[-clip_skip]), None
    return output[0], None


def chunked_embeddings(pipe, text: str, chunk_count: int = 0, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings of `text` chunk by chunk, with A1111 emphasis applied, concatenated along the sequence (at least
    `chunk_count` chunks: shorter texts are padded with empty ones so a prompt and its negative line up).

    Emphasis scales each token's embedding by its weight and then restores the chunk's mean, as A1111 does; the
    pooled embedding (SDXL) is the first chunk's.
    """
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    hidden, pooled = [], None
    per_encoder = [(tokenizer, encoder, _chunks(pipe, tokenizer, text)) for tokenizer, encoder in _tokenizers_and_encoders(pipe)]
    count = max(chunk_count, *(len(chunks) for _, _, chunks in per_encoder))
    for index in range(count):
        parts = []
        for tokenizer, encoder, chunks in per_encoder:
            ids, weights = chunks[index] if index < len(chunks) else ([], [])
            states, pooled_output = _encode_chunk(pipe, tokenizer, encoder, ids, sdxl, clip_skip)
            if pooled_output is not None and encoder is getattr(pipe, "text_encoder_2", None) and index == 0:
                pooled = pooled_output
            token_weights = [1.0, *weights] + [1.0] * (tokenizer.model_max_length - len(weights) - 1)
            if any(weight != 1.0 for weight in token_weights):
                scale = torch.tensor(token_weights, device=states.device, dtype=states.dtype).view(1, -1, 1)
                mean = states.mean()
                states = states * scale
                states = states * (mean / states.mean())
            parts.append(states)
        hidden.append(torch.cat(parts, dim=-1))
    return torch.cat(hidden, dim=1), pooled


def _chunked_conditioning(pipe, settings: GenerationSettings, texts: list[str], weights: torch.Tensor) -> dict:
    """`_encode_prompt`'s result for prompts that need chunks or emphasis: every part and the negative prompt are
    padded to the same number of chunks, so multi-prompt weights and guidance line up."""
    count = max(len(_chunks(pipe, tokenizer, text)) for tokenizer, _ in _tokenizers_and_encoders(pipe)
                for text in texts + [settings.negative_prompt])
    encoded = [chunked_embeddings(pipe, text, count, settings.clip_skip) for text in texts]
    embeds = torch.cat([states for states, _ in encoded])
    prompt_embeds = (embeds * weights.to(embeds.dtype)).sum(0, keepdim=True)
    negative, negative_pooled = chunked_embeddings(pipe, settings.negative_prompt, count, settings.clip_skip)
    if settings.family != "sdxl":
        return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative}
    if not settings.negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
        negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
    pooled = torch.cat([pooled for _, pooled in encoded])
    return {"prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": (pooled * weights[:, :, 0].to(pooled.dtype)).sum(0, keepdim=True),
            "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled}


def _guidance(settings: GenerationSettings) -> dict:
    return {"guidance_scale": settings.cfg}


def text_to_image(entry: CacheEntry, settings: GenerationSettings, on_step: ProgressCallback | None = None,
                  cancel: Event | None = None, factors=None, refiner=None) -> list[Image.Image]:
    """Generate `len(settings.seeds)` images in one batched call; an SDXL `refiner` finishes the last steps."""
    pipe = entry.pipe
    # 1. The sampler of this request, built from the model's own scheduler config.
    pipe.scheduler = make_scheduler(settings.sampler, entry.derived.setdefault("scheduler_config", pipe.scheduler.config))
    # 2. Prompt embeddings once, with multi-prompt weights and per-image chaos.
    conditioning = encode_prompt(pipe, settings, entry.embeddings)
    # 3. One generator per image: image i of seed N equals a single image of seed N+i.
    generators = _generators(str(pipe.device), settings.seeds)
    # 4. The denoising loop, with progress, previews and cancellation at every step.
    callback = _step_callback(settings, settings.steps, on_step, cancel, factors)
    handoff = {"denoising_end": settings.refiner_switch, "output_type": "latent"} if refiner is not None else {}
    with seamless_tiling(pipe.unet if hasattr(pipe, "unet") else None, pipe.vae) if settings.tile else contextlib.nullcontext():
        output = pipe(
            **conditioning, width=settings.width, height=settings.height, num_inference_steps=settings.steps,
            generator=generators, callback_on_step_end=callback, **_guidance(settings), **handoff,
        )
    if refiner is None:
        return list(output.images)
    # 5. The refiner denoises the rest of the schedule from the base's latents (its own text encoder: the second).
    refiner.scheduler = make_scheduler(settings.sampler, entry.derived.setdefault("refiner_scheduler_config",
                                                                                refiner.scheduler.config))
    done = round(settings.steps * settings.refiner_switch)
    refined = refiner(
        **encode_prompt(refiner, settings, entry.embeddings, encoder="refiner"), image=output.images, num_inference_steps=settings.steps,
        denoising_start=settings.refiner_switch, generator=generators,
        callback_on_step_end=_step_callback(settings, settings.steps, on_step, cancel, factors, offset=done),
        **_guidance(settings),
    )
    return list(refined.images)


def _img2img_pipe(entry: CacheEntry):
    if "img2img" not in entry.derived:
        # from_pipe shares the loaded components: no weights are loaded or copied.
        entry.derived["img2img"] = AutoPipelineForImage2Image.from_pipe(entry.pipe)
        entry.derived["img2img"].set_progress_bar_config(disable=True)
    return entry.derived["img2img"]


def image_to_image(entry: CacheEntry, source: Image.Image, settings: GenerationSettings,
                   on_step: ProgressCallback | None = None, cancel: Event | None = None, factors=None) -> list[Image.Image]:
    """Images that start from `source` (noised by `settings.strength`); one batched call."""
    pipe = _img2img_pipe(entry)
    # 1. Sampler and prompt, as for text-to-image.
    pipe.scheduler = make_scheduler(settings.sampler, entry.derived.setdefault("scheduler_config", entry.pipe.scheduler.config))
    conditioning = encode_prompt(pipe, settings, entry.embeddings)
    # 2. The source at the requested size.
    source = source.convert("RGB").resize((settings.width, settings.height), Image.LANCZOS)
    # 3. Denoise from the noised source.
    total = max(1, int(settings.steps * settings.strength))
    callback = _step_callback(settings, total, on_step, cancel, factors)
    extra = {"width": settings.width, "height": settings.height} if settings.family == "flux" else {}
    with seamless_tiling(getattr(pipe, "unet", None), pipe.vae) if settings.tile else contextlib.nullcontext():
        output = pipe(
            **conditioning, image=source, strength=settings.strength, num_inference_steps=settings.steps,
            generator=_generators(str(pipe.device), settings.seeds), callback_on_step_end=callback,
            **_guidance(settings), **extra,
        )
    return list(output.images)


def _feather(size: tuple[int, int], overlap: int, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """A weight mask that ramps up over `overlap` pixels on the edges that touch another tile."""
    width, height = size
    ramp_x = np.ones(width)
    ramp_y = np.ones(height)
    ramp = np.linspace(0.0, 1.0, overlap + 2)[1:-1] if overlap else np.array([])
    left, top, right, bottom = edges
    if left and overlap:
        ramp_x[:overlap] = ramp
    if right and overlap:
        ramp_x[-overlap:] = ramp[::-1]
    if top and overlap:
        ramp_y[:overlap] = ramp
    if bottom and overlap:
        ramp_y[-overlap:] = ramp[::-1]
    return np.outer(ramp_y, ramp_x)[..., None]


def tile_boxes(width: int, height: int, tile: int, overlap: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """Overlapping tiles (left, top, right, bottom) that cover the image; edges snap to `multiple`."""
    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        count = math.ceil((length - overlap) / (tile - overlap))
        step = (length - tile) / (count - 1)
        return sorted({int(round(i * step / multiple) * multiple) for i in range(count)} | {length - tile})

    return [(x, y, x + min(tile, width), y + min(tile, height)) for y in starts(height) for x in starts(width)]


def upscale(entry: CacheEntry, source: Image.Image, settings: GenerationSettings, tile: int, overlap: int, multiple: int,
            on_step: ProgressCallback | None = None, cancel: Event | None = None, factors=None) -> Image.Image:
    """2x: resize, then a low-strength img2img detail pass, in overlapping tiles when the image is large."""
    # 1. Plain 2x resize: the detail pass starts from it.
    resized = source.convert("RGB").resize((settings.width, settings.height), Image.LANCZOS)
    boxes = tile_boxes(settings.width, settings.height, tile, overlap, multiple)
    if len(boxes) == 1:
        return image_to_image(entry, resized, settings, on_step, cancel, factors)[0]
    # 2. Each tile gets its own detail pass; overlaps are blended with feathered masks.
    canvas = np.zeros((settings.height, settings.width, 3))
    weight = np.zeros((settings.height, settings.width, 1))
    for index, (left, top, right, bottom) in enumerate(boxes):
        tile_settings = dataclasses.replace(settings, width=right - left, height=bottom - top,
                                            seeds=(settings.seeds[0] + index,))
        detailed = image_to_image(entry, resized.crop((left, top, right, bottom)), tile_settings, on_step, cancel, factors)[0]
        mask = _feather(detailed.size, overlap, (left > 0, top > 0, right < settings.width, bottom < settings.height))
        canvas[top:bottom, left:right] += np.asarray(detailed, dtype=np.float64) * mask
        weight[top:bottom, left:right] += mask
    return Image.fromarray(np.clip(canvas / np.maximum(weight, 1e-6), 0, 255).round().astype(np.uint8))


MAX_LOADED_LORAS = 8  # LoRA adapters kept loaded per cached pipeline


def activate_loras(entry, loras, registry, max_loaded: int = MAX_LOADED_LORAS) -> None:
    """Make exactly `loras` active on the cached pipeline, with their weights.

    1. Each LoRA is loaded once per pipeline as a named peft adapter (diffusers/peft or kohya/A1111 files).
    2. At most `max_loaded` adapters stay loaded: the least recently used ones this job does not need are deleted.
    3. `set_adapters` activates this job's adapters and weights: switching LoRAs never reloads the pipeline.
    4. A job without LoRAs disables the adapter layers (their weights stay loaded for the next job).
    """
    pipe = entry.pipe
    wanted = [_adapter_name(choice.name) for choice in loras]
    for choice in loras:
        spec = registry.lora(choice.name)
        adapter = _adapter_name(spec.name)
        if entry.adapters.get(adapter) == str(spec.path):
            entry.adapters[adapter] = entry.adapters.pop(adapter)  # most recently used last
            continue
        if adapter in entry.adapters:  # the registry now points the name at another file
            pipe.delete_adapters(adapter)
            del entry.adapters[adapter]
        spare = [name for name in entry.adapters if name not in wanted]  # least recently used first
        for old in spare[:max(0, len(entry.adapters) + 1 - max_loaded)]:
            pipe.delete_adapters(old)  # loaded adapters hold memory the model cache's budget does not count
            del entry.adapters[old]
        if not spec.path.is_file():
            raise UnknownModel(f"LoRA {spec.name}: no file at {spec.path}.")
        try:
            pipe.load_lora_weights(_lora_state_dict(spec.path), adapter_name=adapter)
            if not _adapter_components(pipe, adapter):  # e.g. only text-encoder keys for an encoder this model lacks
                raise ValueError("none of its weights apply to this model")
        except Exception as error:  # a corrupt or foreign file: tell which one
            if _adapter_components(pipe, adapter):
                pipe.delete_adapters(adapter)
            raise ModelLoadError(f"LoRA {spec.name} could not be loaded from {spec.path.name}: "
                                 f"{str(error)[:300]}") from None
        entry.adapters[adapter] = str(spec.path)
    if not entry.adapters:
        return
    if loras:
        pipe.enable_lora()
        pipe.set_adapters(wanted, adapter_weights=[float(c.weight) for c in loras])
    else:
        pipe.disable_lora()


def _lora_state_dict(path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors, for diffusers' `load_lora_weights`, which converts the kohya / A1111 layouts itself
    (SD1.5 and SDXL, `lora_te_` / `lora_te1_` / `lora_te2_` text-encoder keys, LyCORIS LoCon convolutions). What it
    cannot load is refused here with a sentence, before a half-loaded adapter is left behind."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    lycoris = sorted({kind for key in state for kind in ("LoHa", "LoKr")
                      if (".hada_w" if kind == "LoHa" else ".lokr_w") in key})
    if lycoris:
        raise ValueError(f"it is a LyCORIS {' / '.join(lycoris)} file; Dreamloom loads LoRA files (diffusers, peft, "
                         "kohya / A1111 layouts, LyCORIS LoCon), not LoHa or LoKr yet")
    if not any(".lora" in key or "lora_" in key for key in state):
        raise ValueError("it holds no LoRA weights")
    return state


def _adapter_components(pipe, adapter: str) -> list[str]:
    """The pipeline components an adapter was loaded into (none: none of its weights matched this model)."""
    return [component for component, names in pipe.get_list_adapters().items() if adapter in names]


def _adapter_name(name: str) -> str:
    # peft adapter names become module attribute keys: no dots
    return "lora_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
