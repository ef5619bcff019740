"""`dreamloom merge` on the starter models (the shapes and niji models share an architecture): the methods do what
their formulas say, block ratios take exactly their keys, a baked LoRA draws what the LoRA draws, and the single
file loads through diffusers' `from_single_file` and generates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamloom.errors import InvalidRequest
from engine.generation import ImagineRequest
from engine.merge import MergeRecipe, block_of, component_of, plan_merge, write_merge
from engine.registry import load_registry
from engine.service import Engine
from tests.conftest import ROOT, TEST_REGISTRY, pixels, prompt

DREAMLOOM = Path(sys.executable).parent / "dreamloom"


@pytest.fixture
def registry_copy(tmp_path):
    """The tests' registry with absolute paths, in a folder of its own (`--register` writes to it)."""
    text = TEST_REGISTRY.read_text().replace('"../models/', f'"{ROOT}/models/')
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def _merge(registry, out: Path, **fields) -> dict[str, torch.Tensor]:
    recipe = MergeRecipe.from_dict({"a": "starter-shapes", "b": "starter-niji", "dtype": "fp32", **fields})
    plan = plan_merge(recipe, registry)
    write_merge(plan, out, {"format": "pt"})
    return load_file(str(out))


def _sources(registry) -> tuple[dict, dict]:
    plan = plan_merge(MergeRecipe(a="starter-shapes", b="starter-niji"), registry)
    a, b = plan.sources["a"], plan.sources["b"]
    return {k: a.read(k).float() for k in plan.keys}, {k: b.read(k).float() for k in plan.keys}


def test_a_half_weighted_sum_is_the_mean_tensor_by_tensor(registry, tmp_path):
    merged = _merge(registry, tmp_path / "half.safetensors", alpha=0.5, vae="a")
    a, b = _sources(registry)
    unet_and_text = [k for k in a if component_of(k) != "vae"]
    assert len(unet_and_text) > 200
    for key in unet_and_text:
        assert torch.allclose(merged[key], (a[key] + b[key]) / 2, atol=1e-6), key
    assert all(torch.equal(merged[k], a[k]) for k in a if component_of(k) == "vae")


def test_an_input_from_a_output_from_b_block_merge_takes_exactly_those_keys(registry, tmp_path):
    merged = _merge(registry, tmp_path / "blocks.safetensors", alpha=0.5, blocks={"input": 0.0, "output": 1.0})
    a, b = _sources(registry)
    inputs = [k for k in a if (block_of(k) or ("",))[0] == "input"]
    outputs = [k for k in a if (block_of(k) or ("",))[0] == "output"]
    middle = [k for k in a if (block_of(k) or ("",))[0] == "middle"]
    assert inputs and outputs and middle
    assert all(torch.equal(merged[k], a[k]) for k in inputs)
    assert all(torch.allclose(merged[k], b[k], atol=1e-6) for k in outputs)
    differing = [k for k in middle if not torch.equal(a[k], b[k])]
    assert differing and all(torch.allclose(merged[k], (a[k] + b[k]) / 2, atol=1e-6) for k in differing)


def test_add_difference_with_a_equal_to_c_gives_b_back_and_ties_dare_keep_their_promises(registry, tmp_path):
    merged = _merge(registry, tmp_path / "diff.safetensors", method="add_difference", c="starter-shapes", alpha=1.0,
                    vae="b")
    a, b = _sources(registry)
    assert all(torch.allclose(merged[k], b[k], atol=1e-5) for k in b)
    # DARE keeping everything is the mean of the differences; TIES keeping everything of two agreeing models too.
    dare = _merge(registry, tmp_path / "dare.safetensors", method="dare", c="starter-shapes", alpha=1.0, density=1.0)
    ties = _merge(registry, tmp_path / "ties.safetensors", method="ties", c="starter-shapes", alpha=1.0, density=1.0)
    key = next(k for k in a if component_of(k) == "unet" and not torch.equal(a[k], b[k]) and a[k].numel() > 100)
    assert torch.allclose(dare[key], a[key] + (b[key] - a[key]) / 2, atol=1e-5)
    assert torch.allclose(ties[key], b[key], atol=1e-5)  # A - C is zero: only B's difference has a sign
    # DARE at a low density drops most of the difference, rescaling what it keeps.
    sparse = _merge(registry, tmp_path / "dare10.safetensors", method="dare", c="starter-shapes", alpha=1.0, density=0.1)
    changed = (sparse[key] != a[key]).float().mean().item()
    assert 0.02 < changed < 0.2, changed


def test_mismatched_models_are_refused_naming_the_first_key(registry, registry_copy, tmp_path):
    plan = plan_merge(MergeRecipe(a="starter-shapes", b="starter-niji"), registry)
    tensors = {k: plan.sources["a"].read(k).float().contiguous() for k in plan.keys}
    wrong = dict(tensors)
    wrong["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"] = torch.zeros(3, 3)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    # A file whose layout reads as SD1.5 is another family than the starter.
    with pytest.raises(InvalidRequest, match="is a sd15 model and starter-shapes a starter one"):
        plan_merge(MergeRecipe(a="starter-shapes", b=str(tmp_path / "wrong.safetensors")), registry, allow_paths=True)
    from engine.registry import register_model

    registry = register_model(registry_copy, name="wrong", path=tmp_path / "wrong.safetensors", family="starter")
    with pytest.raises(InvalidRequest, match=r"input_blocks\.1\.0\.in_layers\.2\.weight is \[3, 3\] in wrong"):
        plan_merge(MergeRecipe(a="starter-shapes", b="wrong"), registry)
    with pytest.raises(InvalidRequest, match="block_weights has 3 values; starter-shapes has 9 blocks"):
        plan_merge(MergeRecipe(a="starter-shapes", b="starter-niji", block_weights=(0, 1, 0)), registry)
    with pytest.raises(InvalidRequest, match="needs a third model"):
        MergeRecipe.from_dict({"a": "x", "b": "y", "method": "add_difference"})


def test_a_merge_registers_loads_from_a_single_file_and_lies_between_its_parents(registry_copy, tmp_path):
    out = tmp_path / "half.safetensors"
    result = subprocess.run([str(DREAMLOOM), "merge", "--a", "starter-shapes", "--b", "starter-niji", "--alpha", "0.5",
                             "--out", str(out), "--register", "half-niji", "--json"],
                            capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "DREAMLOOM_REGISTRY": str(registry_copy),
                                 "DREAMLOOM_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["registered"] == "half-niji" and Path(document["out"]) == out
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        assert "model.diffusion_model.input_blocks.0.0.weight" in handle.keys()
    assert json.loads(metadata["dreamloom.merge_recipe"])["alpha"] == 0.5
    assert set(json.loads(metadata["dreamloom.parents"])) == {"starter-shapes", "starter-niji"}

    registry = load_registry(registry_copy)
    spec = registry.get("half-niji")
    assert spec.path == out and spec.config is not None and "merge" in spec.tags
    engine = Engine(registry, tmp_path / "cache", device="cpu")
    try:
        for text in ("a yellow star on a blue background", "a blue circle on an orange background"):
            saturations = {}
            for name in ("starter-shapes", "half-niji", "starter-niji"):
                images = engine.imagine(ImagineRequest(prompt(f"{text} --model {name} --seed 5 --n 2 --steps 12"))).images
                hsv = [np.asarray(image.convert("HSV"), dtype=np.float64)[..., 1].mean() for image in images]
                saturations[name] = float(np.mean(hsv))
            # The niji model is the pastel one: its pictures are less saturated; the merge lies between.
            assert saturations["starter-niji"] < saturations["half-niji"] < saturations["starter-shapes"], (text, saturations)
    finally:
        engine.close()


def test_a_baked_lora_draws_what_the_lora_draws(registry_copy, tmp_path):
    registry = load_registry(registry_copy)
    out = tmp_path / "outlined.safetensors"
    plan = plan_merge(MergeRecipe(a="starter-shapes", b="starter-niji", alpha=0.0, loras=(("outline", 0.7),),
                                  dtype="fp32"), registry)
    write_merge(plan, out, {"format": "pt"})
    from engine.registry import register_model

    registry = register_model(registry_copy, name="outlined", path=out, family="starter",
                              config=registry.get("starter-shapes").path)
    engine = Engine(registry, tmp_path / "cache", device="cpu")
    try:
        text = "a yellow star on a blue background --seed 21 --n 2 --steps 12"
        # Applying a LoRA adds its trigger word to the prompt; a baked one needs it written.
        baked = engine.imagine(ImagineRequest(prompt(text.replace("background", "background, lineart")
                                                     + " --model outlined"), route=False)).images
        applied = engine.imagine(ImagineRequest(prompt(f"{text} --model starter-shapes <lora:outline:0.7>"),
                                                route=False)).images
        plain = engine.imagine(ImagineRequest(prompt(f"{text} --model starter-shapes"), route=False)).images
        for x, y, z in zip(baked, applied, plain):
            assert np.abs(pixels(x) - pixels(y)).mean() < 0.5  # the same picture (float rounding apart)
            assert np.abs(pixels(x) - pixels(z)).mean() > 5.0  # and not the plain one
    finally:
        engine.close()


def test_dry_run_says_where_each_block_comes_from(registry_copy, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('a = "starter-shapes"\nb = "starter-niji"\nalpha = 0.3\ntext_encoder = 0.0\n'
                      '[blocks]\noutput = 1.0\n[[loras]]\nname = "outline"\nweight = 0.5\n')
    result = subprocess.run([str(DREAMLOOM), "merge", str(recipe), "--dry-run"], capture_output=True, text=True,
                            timeout=120, env={**__import__("os").environ, "DREAMLOOM_REGISTRY": str(registry_copy)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("text encoder") and "0 x" in line for line in lines)
    assert any(line.startswith("IN01") and "0.3 x" in line for line in lines)
    assert any(line.startswith("OUT00") and "1 x" in line for line in lines)
    assert any("LoRA outline baked in at 0.5" in line for line in lines)
    assert "nothing written" in lines[-1] and not list(tmp_path.glob("*.safetensors"))


def test_flux_blocks_merge_by_double_and_single_groups(tmp_path):
    from engine.registry import ModelSpec, Registry

    keys = ["model.diffusion_model.img_in.weight", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
            "model.diffusion_model.double_blocks.1.img_attn.qkv.weight",
            "model.diffusion_model.single_blocks.0.linear1.weight"]
    for name, value in (("a", 0.0), ("b", 1.0)):
        save_file({key: torch.full((4, 4), value) for key in keys}, str(tmp_path / f"{name}.safetensors"))
    registry = Registry(models={n: ModelSpec(n, tmp_path / f"{n}.safetensors", "flux") for n in "ab"}, loras={},
                        default="a")
    merged = _merge(registry, tmp_path / "groups.safetensors", a="a", b="b", blocks={"double": 0.25, "single": 1.0})
    assert [float(merged[key][0, 0]) for key in keys] == [0.5, 0.25, 0.25, 1.0]
    merged = _merge(registry, tmp_path / "list.safetensors", a="a", b="b", block_weights=[0.1, 0.2, 0.3])
    assert [round(float(merged[key][0, 0]), 3) for key in keys] == [0.5, 0.1, 0.2, 0.3]  # D00, D01, S00
    with pytest.raises(InvalidRequest, match=r"has no input blocks; its groups: double, single"):
        plan_merge(MergeRecipe(a="a", b="b", blocks={"input": 1.0}), registry)


def test_a_merge_as_a_diffusers_folder_draws_what_the_single_file_draws(registry_copy, tmp_path):
    from engine.merge import write_diffusers
    from engine.registry import register_model

    registry = load_registry(registry_copy)
    plan = plan_merge(MergeRecipe(a="starter-shapes", b="starter-niji", alpha=0.5, dtype="fp32"), registry)
    write_merge(plan, tmp_path / "half.safetensors", {"format": "pt"})
    folder = write_diffusers(plan, tmp_path / "half-folder", {"format": "pt"}, tmp_path / "cache")
    assert (folder / "unet").is_dir() and (folder / "model_index.json").is_file()
    register_model(registry_copy, name="half-file", path=tmp_path / "half.safetensors", family="starter",
                   config=registry.get("starter-shapes").path)
    registry = register_model(registry_copy, name="half-folder", path=folder, family="starter")
    engine = Engine(registry, tmp_path / "cache", device="cpu")
    try:
        text = "a white square on a purple background --seed 8 --n 1 --steps 8 --model "
        one = engine.imagine(ImagineRequest(prompt(text + "half-file"), route=False)).images[0]
        two = engine.imagine(ImagineRequest(prompt(text + "half-folder"), route=False)).images[0]
        assert np.abs(pixels(one) - pixels(two)).mean() < 0.5
    finally:
        engine.close()
