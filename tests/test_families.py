"""SD1.5 single files, SDXL and FLUX: the real loading and generation code paths on tiny models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreamloom.errors import ModelLoadError, UnknownModel
from engine.configs import config_folder
from engine.convert import export_ldm_checkpoint
from engine.generation import ImagineRequest, UpscaleRequest, VaryRequest
from engine.models import detect_family, load_pipeline
from engine.params import parse_prompt
from engine.registry import load_registry
from engine.service import Engine
from tests.conftest import mean_abs_diff, pixels
from tests.tiny_models import build_tiny_flux, build_tiny_sdxl, registry_file


@pytest.fixture(scope="module")
def single_file(registry, tmp_path_factory):
    """The starter model written as one SD1.5-layout (LDM) .safetensors file."""
    starter = registry.get("starter-shapes")
    pipe = load_pipeline(starter, "cpu", torch.float32, tmp_path_factory.mktemp("c"))
    return export_ldm_checkpoint(pipe, tmp_path_factory.mktemp("ckpt") / "starter-ldm.safetensors", torch.float32)


def test_single_file_is_detected_as_sd15(single_file):
    assert detect_family(single_file) == "sd15"


def test_single_file_checkpoint_gives_the_same_pixels_as_the_folder(registry, single_file, tmp_path, engine):
    starter = registry.get("starter-shapes")
    path = registry_file(tmp_path, [{"name": "starter-single", "path": str(single_file), "family": "sd15",
                                     "config": str(starter.path), "defaults": {"size": 64, "steps": 20, "sampler": "dpmpp_2m", "cfg": 5.0}}])
    single_engine = Engine(load_registry(path), tmp_path / "cache", device="cpu")
    try:
        text = "a red circle on a blue background --seed 5 --n 2 --steps 8"
        from_file = single_engine.imagine(ImagineRequest(parse_prompt(text)))
        from_folder = engine.imagine(ImagineRequest(parse_prompt(text)))
        assert from_file.images[0].size == (64, 64)
        for a, b in zip(from_file.images, from_folder.images):
            assert mean_abs_diff(a, b) < 0.5
    finally:
        single_engine.close()


def test_shipped_sd15_config_tokenizes_like_clip(tmp_path):
    from transformers import CLIPTokenizer

    folder = config_folder("sd15", tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    sdxl = config_folder("sdxl", tmp_path)
    assert (sdxl / "tokenizer_2" / "vocab.json").is_file()


def test_sdxl_pipeline_generates_varies_and_upscales(tmp_path):
    folder = build_tiny_sdxl(tmp_path / "tiny-sdxl")
    assert detect_family(folder) == "sdxl"
    path = registry_file(tmp_path, [{"name": "tiny-sdxl", "path": str(folder), "family": "sdxl", "defaults": {"size": 128}}])
    engine = Engine(load_registry(path), tmp_path / "cache", device="cpu")
    try:
        result = engine.imagine(ImagineRequest(parse_prompt("a red cat::2 blue dog --seed 3 --n 2 --steps 2 --ar 2:1 --no square")))
        assert [i.size for i in result.images] == [(192, 64)] * 2  # 2:1 at 128^2, in multiples of 64
        again = engine.imagine(ImagineRequest(parse_prompt("a red cat::2 blue dog --seed 3 --n 2 --steps 2 --ar 2:1 --no square")))
        assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))
        varied = engine.vary(VaryRequest(result.images[0], parse_prompt("a red cat --n 2 --steps 4"), "subtle"))
        assert len(varied.images) == 2 and varied.images[0].size == (192, 64)
        upscaled = engine.upscale(UpscaleRequest(result.images[0], parse_prompt("a red cat --steps 4")))
        assert upscaled.images[0].size == (384, 128)
    finally:
        engine.close()


def test_flux_pipeline_generates_and_refuses_other_samplers(tmp_path):
    folder = build_tiny_flux(tmp_path / "tiny-flux")
    assert detect_family(folder) == "flux"
    path = registry_file(tmp_path, [{"name": "tiny-flux", "path": str(folder), "family": "flux", "defaults": {"size": 32}}])
    engine = Engine(load_registry(path), tmp_path / "cache", device="cpu")
    try:
        result = engine.imagine(ImagineRequest(parse_prompt("a red cat on the background --seed 1 --n 2 --steps 2")))
        assert [i.size for i in result.images] == [(32, 32)] * 2
        assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))
        negative = engine.imagine(ImagineRequest(parse_prompt("a red cat --seed 1 --n 1 --steps 2 --no dog")))
        assert negative.images[0].size == (32, 32)
        varied = engine.vary(VaryRequest(result.images[0], parse_prompt("a red cat --n 1 --steps 4"), "strong"))
        assert varied.images[0].size == (32, 32)
        with pytest.raises(Exception, match="does not work with flux"):
            engine.imagine(ImagineRequest(parse_prompt("a red cat --sampler ddim")))
    finally:
        engine.close()


def test_bad_checkpoints_give_clear_messages(tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        detect_family(pickle)
    gguf = tmp_path / "flux1-dev-Q4_K_S.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError, match="GGUF .* not supported yet") as refused:
        detect_family(gguf)
    assert "pickled" not in str(refused.value)  # not the message meant for pickles
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(ModelLoadError, match="not a checkpoint Dreamloom loads"):
        detect_family(onnx)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable"):
        detect_family(garbage)
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        detect_family(tmp_path / "empty-folder")
    with pytest.raises(UnknownModel, match="does not exist"):
        detect_family(tmp_path / "missing")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 1.5, SDXL or FLUX"):
        detect_family(other)
