"""Files users already have (Civitai / Hugging Face / A1111 / kohya habits) load, and what Dreamloom writes opens in
their other tools (#13). Tiny random-weight files in each layout, compared against plain diffusers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.generation import ImagineRequest
from engine.params import parse_prompt
from engine.registry import load_registry
from engine.service import Engine
from tests.conftest import mean_abs_diff
from tests.tiny_models import build_tiny_sdxl, registry_file


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def _sgm_name(name: str, per_block: int) -> str:
    """A diffusers SDXL UNet module name in the original (SGM) layout kohya's SDXL LoRAs use: input_blocks_4_1_..."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return ".".join(["middle_block", "1" if parts[1] == "attentions" else str(2 * int(parts[2])), *parts[3:]])
    block, kind, index = int(parts[1]), parts[2], int(parts[3])
    inner = "1" if kind == "attentions" else "0"
    if parts[0] == "down_blocks":
        return ".".join(["input_blocks", str(1 + block * (per_block + 1) + index), inner, *parts[4:]])
    return ".".join(["output_blocks", str(block * (per_block + 1) + index), inner, *parts[4:]])


_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3"}


def kohya_sdxl_lora(pipe, path, *, unet: bool = True, text: bool = True, conv: bool = False, rank: int = 4) -> None:
    """An SDXL LoRA as kohya sd-scripts writes it (and Civitai serves it): `lora_unet_input_blocks_4_1_...` in the
    SGM layout, `lora_te1_` / `lora_te2_` text-encoder keys, an alpha per layer; `conv` adds LoCon convolutions."""
    generator = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {}

    def add(key: str, module) -> None:
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator) * 0.3
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.3
        else:
            down = torch.randn(rank, module.in_features, generator=generator) * 0.3
            up = torch.randn(module.out_features, rank, generator=generator) * 0.3
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(rank / 2)

    per_block = pipe.unet.config.layers_per_block
    for name, module in pipe.unet.named_modules() if unet else ():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name and \
                name.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn1.to_out.0", "proj_in", "proj_out")):
            add("lora_unet_" + _sgm_name(name, per_block).replace(".", "_"), module)
        if conv and isinstance(module, torch.nn.Conv2d) and ".resnets." in name and name.endswith(("conv1", "conv2")):
            sgm = _sgm_name(name.rsplit(".", 1)[0], per_block) + "." + _SGM_RESNET[name.rsplit(".", 1)[1]]
            add("lora_unet_" + sgm.replace(".", "_"), module)
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)) if text else ():
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "v_proj", "out_proj")):
                add(prefix + name.replace(".", "_"), module)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})


def _registry_with_loras(folder, tmp_path, loras: dict[str, object]):
    tmp_path.mkdir(exist_ok=True)
    path = registry_file(tmp_path, [{"name": "tiny-sdxl", "path": str(folder), "family": "sdxl",
                                     "defaults": {"size": 128}}])
    for name, file in loras.items():
        path.write_text(path.read_text() + f'[[loras]]\nname = "{name}"\npath = "{file}"\nfamily = "sdxl"\nweight = 1.0\n')
    return load_registry(path)


def _image(engine, text: str):
    return engine.imagine(ImagineRequest(parse_prompt(f"{text} --seed 4 --n 1 --steps 3"))).images[0]


def test_kohya_sdxl_loras_with_text_encoder_keys_give_the_pixels_of_plain_diffusers(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    kohya_sdxl_lora(pipe, tmp_path / "full.safetensors", conv=True)
    kohya_sdxl_lora(pipe, tmp_path / "text-only.safetensors", unet=False)
    # The reference: plain diffusers loads the kohya file, fuses it into the weights, and saves a new model.
    pipe.load_lora_weights(str(tmp_path / "full.safetensors"))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "fused")
    registry = _registry_with_loras(tiny_sdxl, tmp_path, {"full": tmp_path / "full.safetensors",
                                                          "text-only": tmp_path / "text-only.safetensors"})
    engine = Engine(registry, tmp_path / "cache", device="cpu")
    fused = Engine(_registry_with_loras(tmp_path / "fused", tmp_path / "f", {}), tmp_path / "cache", device="cpu")
    try:
        plain = _image(engine, "a red cat")
        with_lora = _image(engine, "a red cat <lora:full>")
        assert mean_abs_diff(with_lora, _image(fused, "a red cat")) < 0.5  # as diffusers itself applies it
        assert mean_abs_diff(with_lora, plain) > 2
        # A LoRA of text-encoder layers only (lora_te1_ / lora_te2_) is applied, not dropped.
        assert mean_abs_diff(_image(engine, "a red cat <lora:text-only>"), plain) > 1
        assert mean_abs_diff(_image(engine, "a red cat"), plain) < 0.5  # and switched off again
    finally:
        engine.close()
        fused.close()


def test_a_lora_for_layers_this_model_lacks_is_refused_with_a_sentence(tiny_sdxl, tmp_path):
    from dreamloom.errors import ModelLoadError

    save_file({"lora_unet_input_blocks_40_1_proj_in.lora_down.weight": torch.zeros(2, 64),
               "lora_unet_input_blocks_40_1_proj_in.lora_up.weight": torch.zeros(64, 2)}, str(tmp_path / "odd.safetensors"))
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "empty.safetensors"))
    registry = _registry_with_loras(tiny_sdxl, tmp_path, {"odd": tmp_path / "odd.safetensors",
                                                          "empty": tmp_path / "empty.safetensors"})
    engine = Engine(registry, tmp_path / "cache", device="cpu")
    try:
        for name in ("odd", "empty"):
            with pytest.raises(ModelLoadError, match=f"LoRA {name} could not be loaded") as refused:
                _image(engine, f"a red cat <lora:{name}>")
            assert str(tmp_path) not in str(refused.value)
        assert np.asarray(_image(engine, "a red cat")).std() > 0  # the engine goes on
    finally:
        engine.close()


def _addnet_hash(path) -> str:
    """A1111's LoRA hash, computed here independently: SHA-256 of what follows the safetensors header."""
    import hashlib
    import struct

    data = path.read_bytes()
    return hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()


def test_pngs_name_the_model_and_lora_hashes_for_sd_parsers(engine, registry, tmp_path):
    import io

    from PIL import Image
    from sd_parsers import ParserManager

    from engine.metadata import read_parameters
    from studio.outputs import image_pngs, write_result

    result = engine.imagine(ImagineRequest(parse_prompt("a red circle <lora:outline:0.8> --seed 3 --n 2 --steps 4 --no blue")))
    lora_hash = _addnet_hash(registry.lora("outline").path)[:12]
    model_hash = engine.hashes.model_hash(registry.get("starter-shapes").path)
    assert len(model_hash) == 10 and result.settings.lora_hashes == (("outline", lora_hash),)
    png = Image.open(io.BytesIO(image_pngs(result, "a red circle <lora:outline:0.8>")[1]))
    info = ParserManager().parse(png)  # an independent reader (sd-parsers), as image browsers use
    assert info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M" and sampler.parameters == {"cfg_scale": f"{result.settings.cfg:g}", "seed": "4",
                                                                  "steps": "4"}
    assert (sampler.model.name, sampler.model.hash) == ("starter-shapes", model_hash)
    assert [p.value for p in sampler.prompts] == ["a red circle, lineart <lora:outline:0.8>"]  # its trigger added
    assert [p.value for p in sampler.negative_prompts] == ["blue"]
    assert info.metadata["Size"] == "64x64"
    assert info.metadata["Hashes"] == {"model": model_hash, "lora:outline": lora_hash}
    assert read_parameters(png)["Lora hashes"] == f"outline: {lora_hash}"  # A1111's own field, read as A1111 reads it
    # The grid names the grid's size, not its first image's.
    written = write_result(result, tmp_path, "a red circle")
    assert ParserManager().parse(Image.open(written.grid)).metadata["Size"] == "128x64"


def test_a_single_file_checkpoint_hash_is_a1111s(tmp_path):
    import hashlib

    from engine.hashes import FileHashes

    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.arange(12.0)}, str(checkpoint))
    hashes = FileHashes(tmp_path / "cache" / "hashes.json")
    assert hashes.model_hash(checkpoint) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert FileHashes(tmp_path / "cache" / "hashes.json")._cache  # kept across restarts
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.arange(13.0)}, str(checkpoint))
    assert hashes.model_hash(checkpoint) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]  # a new file


def test_a1111_emphasis_parses_as_a1111_parses_it():
    from engine.attention import parse_emphasis

    assert parse_emphasis("a (red:1.5) circle, [blurry]") == [("a ", 1.0), ("red", 1.5), (" circle, ", 1.0),
                                                               ("blurry", pytest.approx(1 / 1.1))]
    assert parse_emphasis("((cat))") == [("cat", pytest.approx(1.21))]
    assert parse_emphasis("(a (b:2) c:0.5)") == [("a ", 0.5), ("b", 1.0), (" c", 0.5)]
    assert parse_emphasis(r"a \(literal\) bracket") == [("a (literal) bracket", 1.0)]
    assert parse_emphasis("one BREAK two") == [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]
    assert parse_emphasis("at 10:30, unclosed (red") == [("at 10:30, unclosed ", 1.0), ("red", pytest.approx(1.1))]


def _conditioning(engine, spec, text):
    from engine import pipelines
    from engine.generation import model_family, resolve_settings

    settings = resolve_settings(parse_prompt(text + " --n 1"), spec, model_family(spec))
    with engine.cache.acquire(spec) as entry:
        return entry.pipe, settings, pipelines.encode_prompt(entry.pipe, settings)


def test_chunked_encoding_of_a_short_prompt_equals_diffusers_own(engine, registry, tiny_sdxl, tmp_path):
    from engine import pipelines

    sdxl = Engine(_registry_with_loras(tiny_sdxl, tmp_path, {}), tmp_path / "cache", device="cpu")
    try:
        for eng, spec in ((engine, registry.get("starter-shapes")), (sdxl, sdxl.registry.get("tiny-sdxl"))):
            for text in ("a red circle on a blue background --no green", "a red circle"):
                pipe, settings, plain = _conditioning(eng, spec, text)
                assert not pipelines.needs_chunking(pipe, [settings.prompt, settings.negative_prompt])
                with eng.cache.acquire(spec) as entry:
                    chunked = pipelines._chunked_conditioning(entry.pipe, settings, [settings.prompt], torch.ones(1, 1, 1))
                    plain = pipelines._encode_prompt(entry.pipe, settings)  # one row each, before --chaos
                assert plain.keys() == chunked.keys()
                for key in plain:
                    assert torch.allclose(plain[key], chunked[key], atol=1e-6), (spec.name, text, key)
            # Emphasis of 1 is the plain prompt; other weights change the conditioning.
            same = _conditioning(eng, spec, "a (red:1) circle")[2]["prompt_embeds"]
            plain = _conditioning(eng, spec, "a red circle")[2]["prompt_embeds"]
            louder = _conditioning(eng, spec, "a (red:1.5) circle")[2]["prompt_embeds"]
            assert torch.allclose(same, plain, atol=1e-6) and not torch.allclose(louder, plain, atol=1e-3)
    finally:
        sdxl.close()


def test_a_long_prompt_is_encoded_in_chunks_and_its_last_words_count(engine, registry):
    spec = registry.get("starter-shapes")  # a 32-token window: 30 words a chunk
    long = "a red circle on a blue background " + "with a small square and a big triangle " * 4
    pipe, _, with_trigger = _conditioning(engine, spec, long + ", lineart --no green")
    _, _, without = _conditioning(engine, spec, long + " --no green")
    assert len(pipe.tokenizer(long, add_special_tokens=False).input_ids) > 2 * 30
    assert with_trigger["prompt_embeds"].shape[1] == 3 * 32  # three chunks, not one cut at 32 tokens
    assert with_trigger["negative_prompt_embeds"].shape == with_trigger["prompt_embeds"].shape
    assert not torch.allclose(with_trigger["prompt_embeds"], without["prompt_embeds"], atol=1e-4)  # the model sees it
    image = engine.imagine(ImagineRequest(parse_prompt(long + ", lineart --seed 2 --n 1 --steps 4"))).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 5


def _starter_registry(tmp_path, model_extra: str = "", tail: str = ""):
    from tests.conftest import ROOT

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "models.toml"
    path.write_text(f'default = "starter"\n[[models]]\nname = "starter"\npath = "{ROOT}/models/starter-shapes"\n'
                    f'family = "starter"\n{model_extra}\n{tail}')
    return load_registry(path)


def _vae_file(registry, tmp_path, scale: float = 1.0):
    """The starter's VAE as a standalone single file in the original (LDM) layout, as A1111's VAE files are."""
    from diffusers import AutoencoderKL

    from engine.convert import vae_to_ldm

    vae = AutoencoderKL.from_pretrained(registry.get("starter-shapes").path / "vae")
    state = {key: value.float() for key, value in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()}
    state = {key.removeprefix("first_stage_model."): value for key, value in state.items()}
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"] * scale
    path = tmp_path / f"vae-{scale}.safetensors"
    save_file(state, str(path))
    return path


def test_a_vae_override_from_a_single_file_is_used(registry, tmp_path):
    same, darker = _vae_file(registry, tmp_path), _vae_file(registry, tmp_path, 0.5)
    images = {}
    for name, vae in (("own", None), ("same", same), ("darker", darker)):
        extra = f'vae = "{vae}"' if vae else ""
        engine = Engine(_starter_registry(tmp_path / name, extra),
                        tmp_path / "cache", device="cpu")
        images[name] = _image(engine, "a red circle on a blue background")
        engine.close()
    assert mean_abs_diff(images["same"], images["own"]) < 0.5  # the same weights through the single-file loader
    assert mean_abs_diff(images["darker"], images["own"]) > 5  # and the override really decodes


def test_clip_skip_reads_an_earlier_layer_for_prompt_and_negative_alike(registry, tmp_path):
    from engine import pipelines

    engine = Engine(_starter_registry(tmp_path, "clip_skip = 2"), tmp_path / "cache", device="cpu")
    try:
        spec = engine.registry.get("starter")
        pipe, settings, skipped = _conditioning(engine, spec, "a red circle --no green")
        assert settings.clip_skip == 2

        def penultimate(text):  # A1111's Clip skip 2: the layer before the last, then the final norm
            ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
            with torch.no_grad():
                states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
                return pipe.text_encoder.final_layer_norm(states)[0]

        assert torch.allclose(skipped["prompt_embeds"][0], penultimate("a red circle"), atol=1e-5)
        # The negative prompt too (diffusers' encode_prompt skips layers for the prompt only).
        assert torch.allclose(skipped["negative_prompt_embeds"][0], penultimate("green"), atol=1e-5)
        plain = pipelines.encode_prompt(pipe, dataclasses.replace(settings, clip_skip=1))
        assert not torch.allclose(plain["prompt_embeds"], skipped["prompt_embeds"], atol=1e-3)
        assert "Clip skip: 2" in _a1111(engine, "a red circle")
    finally:
        engine.close()


def _a1111(engine, text):
    from engine.metadata import a1111_parameters

    result = engine.imagine(ImagineRequest(parse_prompt(f"{text} --seed 4 --n 1 --steps 2")))
    return a1111_parameters(result.settings, result.seeds[0])


def test_v_prediction_and_zero_terminal_snr_reach_the_scheduler(tmp_path):
    engine = Engine(_starter_registry(tmp_path, 'prediction_type = "v_prediction"\nzero_terminal_snr = true'),
                    tmp_path / "cache", device="cpu")
    try:
        image = _image(engine, "a red circle")
        with engine.cache.acquire(engine.registry.get("starter")) as entry:
            config = entry.pipe.scheduler.config
        assert config.prediction_type == "v_prediction" and config.timestep_spacing == "trailing"
        assert config.rescale_betas_zero_snr is True and image.size == (64, 64)
    finally:
        engine.close()


def test_registry_options_are_checked_with_sentences(tmp_path):
    from dreamloom.errors import ConfigError

    for extra, message in (("clip_skip = 0", "clip_skip is A1111's Clip skip"),
                           ('prediction_type = "sample"', "prediction_type must be one of"),
                           ("zero_terminal_snr = 1", "zero_terminal_snr must be true or false"),
                           ('vae = ""', "vae must be a non-empty text"),
                           ('refiner = "x.safetensors"', "a refiner is a second stage of SDXL models")):
        with pytest.raises(ConfigError, match=message):
            _starter_registry(tmp_path, extra)
    with pytest.raises(ConfigError, match="from .safetensors files only"):
        _starter_registry(tmp_path, tail='[[embeddings]]\nname = "easy"\npath = "easy.pt"\nfamily = "starter"\n')


def test_textual_inversion_embeddings_are_used_by_name_in_a_prompt(tiny_sdxl, tmp_path):
    generator = torch.Generator().manual_seed(3)
    save_file({"emb_params": torch.randn(2, 64, generator=generator)}, str(tmp_path / "shiny.safetensors"))
    save_file({"clip_l": torch.randn(2, 32, generator=generator), "clip_g": torch.randn(2, 32, generator=generator)},
              str(tmp_path / "glossy.safetensors"))
    save_file({"emb_params": torch.randn(1, 768, generator=generator)}, str(tmp_path / "wide.safetensors"))
    starter = Engine(_starter_registry(tmp_path, tail=f'[[embeddings]]\nname = "shinystyle"\npath = "{tmp_path}/shiny.safetensors"\n'
                                                     'family = "starter"\n'), tmp_path / "cache", device="cpu")
    registry = _registry_with_loras(tiny_sdxl, tmp_path / "x", {})
    registry.source.write_text(registry.source.read_text() + f'[[embeddings]]\nname = "glossy"\npath = "{tmp_path}/glossy.safetensors"\n'
                               'family = "sdxl"\n')
    sdxl = Engine(load_registry(registry.source), tmp_path / "cache", device="cpu")
    try:
        for engine, word in ((starter, "shinystyle"), (sdxl, "glossy")):
            plain = _image(engine, "a red circle")
            assert mean_abs_diff(_image(engine, f"a red circle, {word}"), plain) > 1, word
            assert mean_abs_diff(_image(engine, "a red circle"), plain) < 0.5  # only where the name is written
            assert mean_abs_diff(_image(engine, f"a red circle, ({word}:1.3)"), plain) > 1  # in the chunked encoder too
    finally:
        starter.close()
        sdxl.close()
    from dreamloom.errors import ModelLoadError

    wrong = Engine(_starter_registry(tmp_path / "w",
                                     tail=f'[[embeddings]]\nname = "wide"\npath = "{tmp_path}/wide.safetensors"\nfamily = "starter"\n'),
                   tmp_path / "cache", device="cpu")
    with pytest.raises(ModelLoadError, match="768-wide vectors; this model's text encoder takes 64"):
        _image(wrong, "a red circle")
    wrong.close()


def test_refiners_and_inpainting_checkpoints_are_told_apart(tmp_path):
    from dreamloom.errors import ModelLoadError
    from engine.models import detect_family

    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    files = {
        "refiner": ({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(4), unet_in: torch.zeros(8, 4, 3, 3)},
                    "is an SDXL refiner"),
        "sdxl-inpainting": ({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4), unet_in: torch.zeros(8, 9, 3, 3)},
                            "is an SDXL inpainting checkpoint"),
        "sd15-inpainting": ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
                             unet_in: torch.zeros(8, 9, 3, 3)}, "is an SD1.5 inpainting checkpoint"),
    }
    for name, (state, message) in files.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ModelLoadError, match=message):
            detect_family(tmp_path / f"{name}.safetensors")
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
               unet_in: torch.zeros(8, 4, 3, 3)}, str(tmp_path / "sd15.safetensors"))
    assert detect_family(tmp_path / "sd15.safetensors") == "sd15"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)},
              str(tmp_path / "flux1-dev-fp8.safetensors"))
    assert detect_family(tmp_path / "flux1-dev-fp8.safetensors") == "flux"
    engine = Engine(load_registry(registry_file(tmp_path, [{"name": "flux-file", "family": "flux",
                                                            "path": str(tmp_path / "flux1-dev-fp8.safetensors")}])),
                    tmp_path / "cache", device="cpu")
    with pytest.raises(ModelLoadError, match="FLUX transformer file; set `config`"):
        _image(engine, "a red cat")
    engine.close()


def test_a_folder_with_an_fp16_weight_variant_loads_with_variant(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = build_tiny_sdxl(tmp_path / "plain")
    StableDiffusionXLPipeline.from_pretrained(folder).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert list((tmp_path / "fp16" / "unet").glob("*.fp16.safetensors"))
    path = registry_file(tmp_path, [{"name": "v", "path": str(tmp_path / "fp16"), "family": "sdxl", "variant": "fp16",
                                     "defaults": {"size": 128}},
                                    {"name": "plain", "path": str(folder), "family": "sdxl", "defaults": {"size": 128}}])
    engine = Engine(load_registry(path), tmp_path / "cache", device="cpu")
    try:
        assert mean_abs_diff(_image(engine, "a red cat --model v"), _image(engine, "a red cat --model plain")) < 0.5
    finally:
        engine.close()


@pytest.mark.timeout(600)
def test_a_flux_single_file_loads_with_the_text_encoders_of_a_config_folder(tmp_path):
    """A FLUX transformer in the BFL / ComfyUI layout. diffusers' converter assumes FLUX's real width (3072), so the
    file has real-width blocks, one double and one single (a 1 GB file, not 23 GB), in bf16 as such files come."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from tests.tiny_models import build_tiny_flux, flux_to_bfl

    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[16, 56, 56]).to(torch.bfloat16)
    save_file(flux_to_bfl(transformer.state_dict()), str(tmp_path / "flux1-test.safetensors"))
    # The config folder: FLUX's text encoders, tokenizers and VAE (tiny here), with a transformer config that matches.
    config = FluxPipeline.from_pretrained(build_tiny_flux(tmp_path / "tiny"))
    config.transformer = FluxTransformer2DModel.from_config(transformer.config).to(torch.bfloat16)
    config.save_pretrained(tmp_path / "flux-config")
    del config
    path = registry_file(tmp_path, [{"name": "flux-file", "family": "flux", "path": str(tmp_path / "flux1-test.safetensors"),
                                     "config": str(tmp_path / "flux-config"), "defaults": {"size": 16, "steps": 1}}])
    engine = Engine(load_registry(path), tmp_path / "cache", device="cpu")
    try:
        spec = engine.registry.get("flux-file")
        with engine.cache.acquire(spec) as entry:
            loaded = entry.pipe.transformer.state_dict()
            expected = transformer.state_dict()
            assert loaded.keys() == expected.keys()
            assert all(torch.equal(loaded[key].to(torch.bfloat16), expected[key]) for key in expected)
        image = engine.imagine(ImagineRequest(parse_prompt("a red cat --seed 1 --n 1"))).images[0]
        assert image.size == (16, 16)
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["starter-shapes", "starter-niji"])
def test_the_shipped_starter_models_load_in_plain_diffusers_without_a_dtype(name):
    """fp16 weights on disk, float32 in every component's config: a plain from_pretrained runs as it is."""
    from diffusers import StableDiffusionPipeline

    from tests.conftest import ROOT

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models" / name, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe("a red circle on a blue background", num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 5


def test_an_sdxl_refiner_finishes_the_base_models_runs_as_in_diffusers(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from tests.tiny_models import build_tiny_sdxl_refiner

    refiner_folder = build_tiny_sdxl_refiner(tmp_path / "tiny-refiner")
    path = registry_file(tmp_path, [{"name": "xl", "path": str(tiny_sdxl), "family": "sdxl", "refiner": str(refiner_folder),
                                     "refiner_switch": 0.5, "defaults": {"size": 128, "sampler": "euler", "cfg": 6.0}},
                                    {"name": "xl-alone", "path": str(tiny_sdxl), "family": "sdxl",
                                     "defaults": {"size": 128, "sampler": "euler", "cfg": 6.0}}])
    engine = Engine(load_registry(path), tmp_path / "cache", device="cpu")
    steps = []
    try:
        result = engine.imagine(ImagineRequest(parse_prompt("a red cat --seed 5 --n 1 --steps 8 --model xl")),
                                on_step=lambda progress: steps.append((progress.step, progress.total)))
        alone = engine.imagine(ImagineRequest(parse_prompt("a red cat --seed 5 --n 1 --steps 8 --model xl-alone"))).images[0]
    finally:
        engine.close()
    assert [s for s, _ in steps] == list(range(1, 9)) and {t for _, t in steps} == {8}  # 4 base + 4 refiner steps
    assert result.settings.refiner == "tiny-refiner" and result.settings.refiner_switch == 0.5
    # The reference: diffusers' own "ensemble of expert denoisers" with the same seed, steps and switch.
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, text_encoder_2=base.text_encoder_2,
                                                               tokenizer_2=base.tokenizer_2, vae=base.vae)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    latents = base("a red cat", num_inference_steps=8, denoising_end=0.5, output_type="latent", guidance_scale=6.0,
                   width=128, height=128, generator=[torch.Generator().manual_seed(5)]).images
    expected = refiner("a red cat", image=latents, num_inference_steps=8, denoising_start=0.5, guidance_scale=6.0,
                       generator=[torch.Generator().manual_seed(5)]).images[0]
    assert mean_abs_diff(result.images[0], expected) < 0.5
    assert mean_abs_diff(result.images[0], alone) > 1  # the refiner did change the picture
    from engine.metadata import a1111_parameters

    assert "Refiner: tiny-refiner, Refiner switch at: 0.5" in a1111_parameters(result.settings, 5)
