"""LoRAs at runtime (named peft adapters switched per job), the kohya layout, and the LoRA trainer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.generation import ImagineRequest
from engine.params import parse_prompt
from engine.registry import load_registry
from engine.service import Engine
from tests.conftest import ROOT, TEST_REGISTRY, mean_abs_diff, pixels
from tests.aio import run

KIT = ROOT / "models" / "loras"
pytestmark = pytest.mark.skipif(not (KIT / "outline.safetensors").is_file(), reason="the starter kit's LoRAs are not built")


def to_peft(kohya_file, peft_file) -> None:
    """Rewrite a kohya-layout LoRA (the kit's) in the diffusers/peft layout (`unet.down_blocks...lora_A.weight`);
    the kit's alpha equals its rank, so the weights need no scaling."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ROOT / "models" / "starter-shapes", subfolder="unet")
    modules = {name.replace(".", "_"): name for name, _ in unet.named_modules() if name}
    state = load_file(str(kohya_file))
    converted = {}
    for key, value in state.items():
        layer, kind = key.split(".", 1)
        module = modules[layer.removeprefix("lora_unet_")]
        if kind == "alpha":
            assert float(value) == state[f"{layer}.lora_down.weight"].shape[0]
        else:
            converted[f"unet.{module}.lora_{'A' if kind == 'lora_down.weight' else 'B'}.weight"] = value
    save_file(converted, str(peft_file))


def registry_with(tmp_path, extra: str = ""):
    text = TEST_REGISTRY.read_text().replace('path = "../models/', f'path = "{ROOT}/models/') + extra
    path = tmp_path / "models.toml"
    path.write_text(text)
    return load_registry(path)


def grid(engine, text):
    return engine.imagine(ImagineRequest(parse_prompt(text + " --seed 11 --steps 6 --n 1"))).images[0]


def test_switching_loras_gives_the_pixels_of_a_fresh_load_and_never_reloads(tmp_path):
    registry = registry_with(tmp_path)
    switching = Engine(registry, tmp_path / "cache", device="cpu")
    prompts = ["a red circle <lora:outline>", "a red circle <lora:night:0.8>", "a red circle --model starter-shapes",
               "a red circle <lora:outline:0.5> <lora:night:0.5>", "a red circle <lora:outline>"]
    switched = [grid(switching, p) for p in prompts]
    assert switching.cache.loads == 1  # one pipeline load for five LoRA combinations
    for text, image in zip(prompts, switched):
        fresh = Engine(registry, tmp_path / "cache", device="cpu")
        assert mean_abs_diff(grid(fresh, text), image) < 0.5, text
        fresh.close()
    assert mean_abs_diff(switched[0], switched[4]) < 0.5
    assert mean_abs_diff(switched[0], switched[2]) > 5  # the LoRA does change the picture
    switching.close()


def test_least_recently_used_adapters_are_unloaded_beyond_the_limit(tmp_path):
    registry = registry_with(tmp_path)
    engine = Engine(registry, tmp_path / "cache", device="cpu", max_loaded_loras=1)

    def loaded():
        with engine.cache.acquire(registry.resolve(None)) as entry:
            return sorted(entry.adapters), sorted(entry.pipe.unet.peft_config)

    first = grid(engine, "a red circle <lora:outline>")
    names, in_unet = loaded()
    assert names == in_unet and len(names) == 1
    grid(engine, "a red circle <lora:night>")
    names, in_unet = loaded()
    assert len(names) == 1 and names == in_unet and "outline" not in " ".join(names)  # outline was unloaded
    again = grid(engine, "a red circle <lora:outline>")  # loaded again from its file: the same picture
    assert mean_abs_diff(first, again) < 0.5
    both = grid(engine, "a red circle <lora:outline:0.5> <lora:night:0.5>")  # a job may need more than the limit
    assert len(loaded()[0]) == 2 and mean_abs_diff(both, first) > 1
    assert engine.cache.loads == 1
    engine.close()


def test_the_kit_lora_in_kohya_layout_matches_its_peft_layout_twin(tmp_path):
    assert load_file(str(KIT / "outline.safetensors")).keys() >= {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight", "lora_unet_down_blocks_1_attentions_0_proj_in.alpha"}
    to_peft(KIT / "outline.safetensors", tmp_path / "outline-peft.safetensors")
    registry = registry_with(tmp_path, f"""
[[loras]]
name = "outline-peft"
path = "{tmp_path / 'outline-peft.safetensors'}"
family = "starter"
triggers = ["lineart"]
weight = 1.0
""")
    engine = Engine(registry, tmp_path / "cache", device="cpu")
    assert mean_abs_diff(grid(engine, "a blue star <lora:outline-peft>"), grid(engine, "a blue star <lora:outline>")) < 0.5
    engine.close()


def test_lycoris_loha_and_lokr_files_get_a_sentence_not_a_traceback(tmp_path):
    from dreamloom.errors import ModelLoadError

    layer = "lora_unet_down_blocks_1_attentions_0_proj_in"
    files = {"loha": {f"{layer}.hada_w1_a": torch.zeros(4, 2), f"{layer}.hada_w1_b": torch.zeros(2, 4),
                      f"{layer}.hada_w2_a": torch.zeros(4, 2), f"{layer}.hada_w2_b": torch.zeros(2, 4),
                      f"{layer}.alpha": torch.tensor(2.0)},
             "lokr": {f"{layer}.lokr_w1": torch.zeros(2, 2), f"{layer}.lokr_w2": torch.zeros(2, 2)}}
    extra = ""
    for name, state in files.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        extra += f'\n[[loras]]\nname = "{name}"\npath = "{tmp_path / name}.safetensors"\nfamily = "starter"\n'
    engine = Engine(registry_with(tmp_path, extra), tmp_path / "cache", device="cpu")
    try:
        for name, kind in (("loha", "LoHa"), ("lokr", "LoKr")):
            with pytest.raises(ModelLoadError, match=f"LyCORIS {kind} file; Dreamloom loads LoRA files"):
                grid(engine, f"a blue star <lora:{name}>")
        grid(engine, "a blue star")  # the engine goes on
    finally:
        engine.close()


def _edge_energy(image) -> float:
    """Mean absolute difference between neighbouring pixels: contours raise it."""
    grey = pixels(image).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def _brightness(image) -> float:
    return float(pixels(image).mean())


def test_the_kit_loras_move_the_output_toward_their_style(tmp_path):
    registry = registry_with(tmp_path)
    engine = Engine(registry, tmp_path / "cache", device="cpu")
    prompts = ["a yellow circle on a blue background", "a green square on a white background",
               "a red star on a yellow background", "an orange triangle on a purple background"]
    report = {}
    for lora, statistic in (("outline", _edge_energy), ("night", _brightness)):
        plain = np.mean([statistic(grid(engine, p)) for p in prompts])
        styled = np.mean([statistic(grid(engine, f"{p} <lora:{lora}>")) for p in prompts])
        report[lora] = (round(float(plain), 3), round(float(styled), 3))
    print("\nstyle statistics (plain, with LoRA):", json.dumps(report))
    assert report["outline"][1] > report["outline"][0] * 1.05  # weak: see the README
    assert report["night"][1] < report["night"][0] * 0.7
    # The niji model is its own base (the pastel LoRA fused in): a different picture for the same seed.
    niji = [grid(engine, f"{p} --niji") for p in prompts]
    plain = [grid(engine, p) for p in prompts]
    change = np.mean([mean_abs_diff(a, b) for a, b in zip(niji, plain)])
    print(f"niji vs starter: mean abs pixel difference {change:.1f}; brightness "
          f"{np.mean([_brightness(i) for i in niji]):.1f} vs {np.mean([_brightness(i) for i in plain]):.1f}")
    assert change > 3
    engine.close()


def test_the_trainer_reads_a_kohya_folder_and_writes_a_kohya_lora_plain_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from engine.training.styles import write_style_dataset
    from cli.main import main

    imagefolder = write_style_dataset(tmp_path / "night", "night", 64)
    # sd-scripts' DreamBooth layout: `N_trigger class/` with .caption files (and one image captioned by its folder).
    dataset = tmp_path / "kohya"
    subset = dataset / "10_nightfall scene"
    subset.mkdir(parents=True)
    for index, line in enumerate((imagefolder / "metadata.jsonl").read_text().splitlines()):
        row = json.loads(line)
        (imagefolder / row["file_name"]).rename(subset / row["file_name"])
        if index:
            (subset / row["file_name"]).with_suffix(".caption").write_text(row["text"])
    out = tmp_path / "night-test.safetensors"
    assert main(["train-lora", str(dataset), "--base", "starter-shapes", "--trigger", "nightfall", "--out", str(out),
                 "--steps", "15", "--json"]) == 0
    with safe_open(str(out), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.alpha" in keys
    assert not any("lora_A" in key or key.startswith("unet.") for key in keys)  # kohya's layout only
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "8"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_sd_model_name"] == "starter-shapes"
    assert metadata["modelspec.trigger_phrase"] == "nightfall" and metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"10_nightfall scene": {"n_repeats": 10, "img_count": 64}}
    tags = json.loads(metadata["ss_tag_frequency"])["10_nightfall scene"]
    assert tags["nightfall"] == 63 and tags["nightfall scene"] == 1  # the uncaptioned image took its folder's words
    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models" / "starter-shapes", dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    pipe.load_lora_weights(str(out))
    after = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert np.abs(before - after).mean() > 1e-4


def test_the_studio_stores_the_route_and_the_worker_applies_it(tmp_path):

    from studio.service import Studio
    from studio.settings import Settings
    from studio.worker import Worker

    async def scenario():
        registry_with(tmp_path)
        studio = await Studio.open(Settings(data_dir=tmp_path / "data", registry=tmp_path / "models.toml"))
        engine = Engine(studio.registry, tmp_path / "cache", device="cpu")
        job = await studio.submit_imagine("alice", "a comic book red star --steps 4 --seed 5")
        assert job.loras == [{"name": "outline", "weight": 1.0}] and "keyword \u201ccomic\u201d" in job.route_reason
        assert job.prompt == "a comic book red star, lineart"
        assert await Worker(studio, engine, "test:1:1").run_one()
        done = await studio.job(job.id)
        upscale = await studio.submit_from_image("bob", done.images[0].id, "upscale", "detail")
        assert upscale.loras == job.loras  # an upscale keeps its source's LoRAs
        assert done.status == "done" and done.settings["prompt"] == "a comic book red star, lineart"
        engine.close()
        await studio.close()

    run(scenario())


def test_the_trainer_says_when_a_dataset_is_too_small(tmp_path, capsys):
    from PIL import Image as PILImage

    from cli.main import main

    dataset = tmp_path / "one"
    dataset.mkdir()
    PILImage.new("RGB", (64, 64), (10, 20, 200)).save(dataset / "a.png")
    (dataset / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a blue square"}) + "\n")
    out = tmp_path / "one.safetensors"
    assert main(["train-lora", str(dataset), "--base", "starter-shapes", "--trigger", "solo", "--out", str(out),
                 "--steps", "1", "--batch", "1", "--json"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "holds 1 image(s)" in err and "copies them" in err
    assert out.is_file()
