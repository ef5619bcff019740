"""Loading pipelines from diffusers folders and single-file checkpoints, offline."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL, FluxPipeline, FluxTransformer2DModel, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

from dreamloom.errors import ModelLoadError, UnknownModel
from engine.configs import config_folder
from engine.detect import PICKLED_SUFFIXES, detect_family  # noqa: F401 - detect_family is also used from here
from engine.registry import ModelSpec

log = logging.getLogger(__name__)

# Loading is silent: progress bars would garble the CLI's JSON and the service's logs.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

PIPELINE_CLASSES = {
    "starter": StableDiffusionPipeline,
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "flux": FluxPipeline,
}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}




def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())


def estimate_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Memory the loaded pipeline will take, from tensor shapes in the file headers (no weights read)."""
    target = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    total = 0
    files = _weight_files(spec.path) + (_weight_files(spec.refiner) if spec.refiner and spec.refiner.exists() else [])
    for file in files:
        if file.suffix != ".safetensors":
            total += file.stat().st_size
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    numel = 1
                    for dim in view.get_shape():
                        numel *= dim
                    stored = view.get_dtype()
                    # Floating weights load in the compute dtype: fp8 files (1 byte on disk) take 2-4 bytes loaded.
                    floating = stored in ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2")
                    total += numel * (target if floating else _DTYPE_BYTES.get(stored, 4))
        except Exception:
            total += file.stat().st_size
    return total


def check_safetensors_only(folder: Path) -> None:
    """A diffusers folder whose component has pickled weights and no .safetensors is refused: unpickling a file
    can run code, and the README promises safetensors only."""
    for component in sorted({p.parent for p in folder.rglob("*") if p.suffix in PICKLED_SUFFIXES and p.is_file()}):
        if not any(component.glob("*.safetensors")):
            where = component.relative_to(folder).as_posix() or "."
            raise ModelLoadError(f"Model folder {folder.name} has pickled weights in {where}/ and no .safetensors; only "
                                 "safetensors are loaded (pickles can run code). Convert it first, e.g. with diffusers' "
                                 "save_pretrained(..., safe_serialization=True).")


def load_pipeline(spec: ModelSpec, device: str, dtype: torch.dtype, cache_dir: Path):
    """Load `spec` as a diffusers pipeline on `device`, never touching a network.

    1. The checkpoint: a diffusers folder (with its weight `variant`, if set) or a single file with a shipped config.
    2. The VAE override, the scheduler's prediction type, and the textual-inversion embeddings of models.toml.
    """
    if not spec.path.exists():
        raise UnknownModel(f"Model {spec.name!r}: nothing at {spec.path}.")
    pipeline_class = PIPELINE_CLASSES[spec.family]
    extra = {"safety_checker": None, "requires_safety_checker": False} if pipeline_class is StableDiffusionPipeline else {}
    if spec.path.is_dir():
        check_safetensors_only(spec.path)
    try:
        if spec.path.is_dir():
            variant = {"variant": spec.variant} if spec.variant else {}
            pipe = pipeline_class.from_pretrained(spec.path, dtype=dtype, local_files_only=True, use_safetensors=True,
                                                  **variant, **extra)
        elif spec.family == "flux":
            pipe = _flux_from_single_file(spec, dtype)
        else:
            config = spec.config or config_folder(spec.family, cache_dir)
            pipe = pipeline_class.from_single_file(
                str(spec.path), config=str(config), dtype=dtype, local_files_only=True, **extra
            )
        if spec.vae is not None:
            pipe.vae = _load_vae(spec, dtype, cache_dir)
        if spec.prediction_type or spec.zero_terminal_snr:
            overrides = {"prediction_type": spec.prediction_type} if spec.prediction_type else {}
            if spec.zero_terminal_snr:  # as the v-pred models trained so ask: no noise left at the last step
                overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
        for embedding in spec.embeddings:
            _load_embedding(pipe, embedding)
    except (ModelLoadError, UnknownModel):
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:
        log.exception("loading %s failed", spec.path)
        raise ModelLoadError(f"Model {spec.name!r} could not be loaded: {type(error).__name__}: {str(error)[:300]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_refiner(spec: ModelSpec, base, dtype: torch.dtype, cache_dir: Path):
    """The SDXL refiner of `spec` (a file or diffusers folder), sharing the base pipeline's second text encoder and
    VAE, as diffusers' "ensemble of expert denoisers" does: only the refiner's UNet is loaded."""
    path = spec.refiner
    if not path.exists():
        raise UnknownModel(f"Model {spec.name!r}: no refiner at {path}.")
    shared = {"text_encoder_2": base.text_encoder_2, "tokenizer_2": base.tokenizer_2, "vae": base.vae}
    try:
        if path.is_dir():
            check_safetensors_only(path)
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                path, dtype=dtype, local_files_only=True, use_safetensors=True, **shared)
        else:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
            if any(k.startswith("conditioner.embedders.1.") for k in keys) or \
                    not any(k.startswith("conditioner.embedders.0.model.") for k in keys):
                raise ModelLoadError(f"Model {spec.name!r}: {path.name} is not an SDXL refiner checkpoint.")
            refiner = StableDiffusionXLImg2ImgPipeline.from_single_file(
                str(path), config=str(config_folder("sdxl_refiner", cache_dir)), dtype=dtype, local_files_only=True,
                **shared)
    except (ModelLoadError, UnknownModel):
        raise
    except Exception as error:
        log.exception("loading the refiner %s failed", path)
        raise ModelLoadError(f"Model {spec.name!r}: its refiner could not be loaded: {type(error).__name__}: "
                             f"{str(error)[:300]}") from None
    refiner.set_progress_bar_config(disable=True)
    return refiner.to(base.device)


def _flux_from_single_file(spec: ModelSpec, dtype: torch.dtype):
    """A FLUX transformer file (the BFL / ComfyUI / Civitai layout), with the text encoders, tokenizers and VAE of the
    FLUX diffusers folder that `config` names (its own transformer weights are not read)."""
    if spec.config is None or not (spec.config / "model_index.json").is_file():
        raise ModelLoadError(f"{spec.path.name} is a FLUX transformer file; set `config` in its models.toml entry to a "
                             "FLUX diffusers folder (FLUX.1-dev or -schnell), which supplies the text encoders and VAE.")
    transformer = FluxTransformer2DModel.from_single_file(str(spec.path), config=str(spec.config), subfolder="transformer",
                                                          dtype=dtype, local_files_only=True)
    return FluxPipeline.from_pretrained(spec.config, transformer=transformer, dtype=dtype, local_files_only=True,
                                        use_safetensors=True)


def _load_vae(spec: ModelSpec, dtype: torch.dtype, cache_dir: Path) -> AutoencoderKL:
    """The VAE named by `vae = ...`: a diffusers folder (or a model folder's `vae/`) or a single file, as A1111's
    VAE files are (e.g. vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors)."""
    vae = spec.vae
    if not vae.exists():
        raise UnknownModel(f"Model {spec.name!r}: no VAE at {vae}.")
    if vae.is_dir():
        folder = vae if (vae / "config.json").is_file() else vae / "vae"
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"Model {spec.name!r}: {vae.name} is not a VAE folder (no config.json).")
        return AutoencoderKL.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
    if vae.suffix != ".safetensors":
        raise ModelLoadError(f"Model {spec.name!r}: VAE files are loaded from .safetensors only (pickles can run code).")
    if spec.family in ("sd15", "sdxl"):
        config = config_folder(spec.family, cache_dir) / "vae"
    else:  # the starter models: their own folder's VAE config
        config = (spec.path if spec.path.is_dir() else spec.config) / "vae"
    return AutoencoderKL.from_single_file(str(vae), config=str(config), dtype=dtype, local_files_only=True)


def _load_embedding(pipe, embedding) -> None:
    """A textual inversion, invoked by its name in a prompt as in A1111. SD1.5 files hold one tensor (`emb_params`,
    or A1111's `string_to_param`); SDXL files hold `clip_l` and `clip_g`, one per text encoder."""
    if not embedding.path.is_file():
        raise UnknownModel(f"Embedding {embedding.name}: no file at {embedding.path}.")
    try:
        state = load_file(str(embedding.path))
    except Exception:  # safetensors raises several types for a broken file
        raise ModelLoadError(f"Embedding {embedding.name}: {embedding.path.name} is not a readable .safetensors file.") from None
    if getattr(pipe, "text_encoder_2", None) is not None:
        if not {"clip_l", "clip_g"} <= set(state):
            raise ModelLoadError(f"Embedding {embedding.name}: an SDXL embedding holds clip_l and clip_g tensors; "
                                 f"{embedding.path.name} has {', '.join(sorted(state)) or 'none'}.")
        pipe.load_textual_inversion(state["clip_l"], token=embedding.name, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=embedding.name, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        return
    tensors = [value for key, value in state.items() if key in ("emb_params", "string_to_param.*")] or list(state.values())
    if len(tensors) != 1:
        raise ModelLoadError(f"Embedding {embedding.name}: expected one embedding tensor (emb_params) in "
                             f"{embedding.path.name}; found {len(tensors)}.")
    vectors = tensors[0] if tensors[0].ndim == 2 else tensors[0].unsqueeze(0)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        raise ModelLoadError(f"Embedding {embedding.name} has {vectors.shape[1]}-wide vectors; this model's text "
                             f"encoder takes {width} (is it for another model family?).")
    pipe.load_textual_inversion(vectors, token=embedding.name)
