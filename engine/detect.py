"""Which family a checkpoint on disk belongs to, from its folder's model_index.json or its tensor names (torch-free:
the registry resolves paths with it in processes that never load a model)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from dreamloom.errors import ModelLoadError, UnknownModel

_FOLDER_CLASSES = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}

PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")  # unpickling can run code: never loaded


def detect_family(path: Path) -> str:
    """The family of a checkpoint: from model_index.json for a folder, from tensor names for a file."""
    path = Path(path)
    if not path.exists():
        raise UnknownModel(f"No checkpoint at {str(path)!r}: the file or folder does not exist.")
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{path} is a folder but not a diffusers model (no model_index.json).")
        try:
            class_name = json.loads(index.read_text())["_class_name"]
        except (ValueError, KeyError):
            raise ModelLoadError(f"{index} is not a valid diffusers model_index.json.") from None
        if (path / "dreamloom.json").is_file():
            return json.loads((path / "dreamloom.json").read_text()).get("family", "starter")
        if class_name not in _FOLDER_CLASSES:
            raise ModelLoadError(f"{path} holds a {class_name}; supported: {', '.join(_FOLDER_CLASSES)}.")
        return _FOLDER_CLASSES[class_name]
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"{path.name}: GGUF (quantised) checkpoints are not supported yet; use the model's "
                             ".safetensors file or its diffusers folder.")
    if path.suffix.lower() in PICKLED_SUFFIXES:
        raise ModelLoadError(
            f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt/.pt files can run code); convert it first."
        )
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path.name}: not a checkpoint Dreamloom loads; use a .safetensors file or a diffusers "
                             "folder.")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
    except Exception:  # safetensors raises several types for a broken header
        raise ModelLoadError(f"{path.name} is not a readable .safetensors file.") from None
    in_channels = _unet_in_channels(path, keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        if in_channels == 9:
            raise ModelLoadError(f"{path.name} is an SDXL inpainting checkpoint; Dreamloom generates from text and "
                                 "images with text-to-image checkpoints and does not inpaint yet.")
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):  # OpenCLIP-G alone: the refiner
        raise ModelLoadError(f"{path.name} is an SDXL refiner, a second stage rather than a model of its own: name it "
                             "as `refiner` in an SDXL model's models.toml entry.")
    if any(k.startswith(FLUX_PREFIXES) for k in keys):
        return "flux"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError(f"{path.name} is a Stable Diffusion 2 checkpoint; supported: SD1.5, SDXL, FLUX.")
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        if in_channels == 9:
            raise ModelLoadError(f"{path.name} is an SD1.5 inpainting checkpoint; Dreamloom generates from text and "
                                 "images with text-to-image checkpoints and does not inpaint yet.")
        return "sd15"
    raise ModelLoadError(f"{path.name} is not a Stable Diffusion 1.5, SDXL or FLUX checkpoint.")


FLUX_PREFIXES = ("double_blocks.", "model.diffusion_model.double_blocks.")


def _unet_in_channels(path: Path, keys: list[str]) -> int | None:
    """The input channels of an LDM UNet's first convolution: 4 for text-to-image, 9 for inpainting models."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    if key not in keys:
        return None
    with safe_open(str(path), framework="numpy") as handle:
        return handle.get_slice(key).get_shape()[1]
