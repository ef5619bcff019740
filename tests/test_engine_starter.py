"""The engine end to end on the committed starter model, on CPU."""
from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading

import numpy as np
import pytest

from dreamloom.errors import GenerationCancelled, InvalidImage, InvalidPrompt, ModelTooLarge, UnknownModel
from engine.generation import ImagineRequest, UpscaleRequest, VaryRequest
from engine.pipelines import tile_boxes
from engine.registry import ModelSpec, Registry
from tests.conftest import mean_abs_diff, pixels, prompt
from tests.aio import run

FAST = " --steps 12"


def imagine(engine, text, **kwargs):
    return engine.imagine(ImagineRequest(prompt(text + FAST), kwargs.pop("init_image", None)), **kwargs)


@pytest.fixture(scope="module")
def grid(engine):
    return imagine(engine, "a red circle on a blue background --seed 7")


def test_grid_has_four_images_with_consecutive_seeds(grid):
    assert len(grid.images) == 4
    assert grid.seeds == (7, 8, 9, 10)
    assert all(image.size == (64, 64) for image in grid.images)
    assert grid.settings.model == "starter-shapes"


def test_same_seed_gives_identical_pixels(engine, grid):
    again = imagine(engine, "a red circle on a blue background --seed 7")
    for first, second in zip(grid.images, again.images):
        assert np.array_equal(pixels(first), pixels(second))


def test_different_seeds_differ(grid):
    assert mean_abs_diff(grid.images[0], grid.images[1]) > 1.0


def test_grid_image_equals_a_single_image_of_its_seed(engine, grid):
    single = imagine(engine, "a red circle on a blue background --seed 9 --n 1")
    assert single.seeds == (9,)
    assert mean_abs_diff(single.images[0], grid.images[2]) < 0.5


def test_aspect_ratio_sets_the_size(engine):
    result = imagine(engine, "a green star on a white background --ar 16:9 --n 1 --seed 1")
    assert result.images[0].size == (80, 48)


def test_variations_stay_close_to_their_source(engine, grid):
    source = grid.images[0]
    base = dataclasses.replace(prompt("a red circle on a blue background" + FAST), seed=100)
    subtle = engine.vary(VaryRequest(source, base, "subtle"))
    strong = engine.vary(VaryRequest(source, base, "strong"))
    assert len(subtle.images) == 4 and subtle.images[0].size == source.size
    subtle_distance = np.mean([mean_abs_diff(source, image) for image in subtle.images])
    strong_distance = np.mean([mean_abs_diff(source, image) for image in strong.images])
    unrelated = np.mean([mean_abs_diff(source, image) for image in
                         imagine(engine, "a yellow square on a purple background --seed 3").images])
    assert subtle_distance < 25
    assert subtle_distance < strong_distance < unrelated
    assert len({image.tobytes() for image in subtle.images}) == 4


def test_upscale_doubles_the_size_and_stays_close(engine, grid):
    source = grid.images[1]
    result = engine.upscale(UpscaleRequest(source, prompt("a red circle on a blue background --seed 8")))
    upscaled = result.images[0]
    assert upscaled.size == (128, 128)
    assert result.settings.strength == pytest.approx(0.3)
    assert mean_abs_diff(upscaled.resize(source.size), source) < 12


def test_large_upscale_runs_in_tiles_and_stays_close(engine, grid):
    single_pass, tiled_passes = [], []
    first = engine.upscale(UpscaleRequest(grid.images[0], prompt("a red circle on a blue background --seed 7")),
                           on_step=single_pass.append).images[0]
    second = engine.upscale(UpscaleRequest(first, prompt("a red circle on a blue background --seed 7")),
                            on_step=tiled_passes.append)
    assert second.images[0].size == (256, 256)
    # One detail pass per overlapping 128x128 tile (the starter's tile is twice its native side).
    tiles = tile_boxes(256, 256, 128, 16, 16)
    assert len(tiles) == 9
    assert len(tiled_passes) == len(tiles) * len(single_pass)
    assert mean_abs_diff(second.images[0].resize(first.size), first) < 12


def test_tile_boxes_cover_the_image():
    boxes = tile_boxes(320, 192, 128, 16, 16)
    covered = np.zeros((192, 320), dtype=bool)
    for left, top, right, bottom in boxes:
        assert right - left == 128 and bottom - top == 128
        covered[top:bottom, left:right] = True
    assert covered.all()


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_progress_reports_every_step_with_a_preview_that_looks_like_the_result(engine, sampler):
    from engine.images import make_grid

    seen = []
    request = ImagineRequest(prompt(f"a blue square on a yellow background --seed 2 --n 2 --steps 16 --sampler {sampler}"))
    result = engine.imagine(request, on_step=lambda p: seen.append((p.step, p.total, p.preview())))
    assert [step for step, _, _ in seen] == list(range(1, 17))
    assert all(total == 16 for _, total, _ in seen)
    final = make_grid(result.images)
    assert all(preview.size == final.size for _, _, preview in seen)  # decoded by the starter's own small VAE
    assert mean_abs_diff(seen[-1][2], final) < 1
    # Three quarters of the way the preview already shows the picture it becomes (the predicted final latents,
    # not the noisy ones: those were 40-80 levels off here, in the wrong colours).
    assert mean_abs_diff(seen[11][2], final) < 15


def test_cancel_stops_the_job_and_the_engine_keeps_working(engine):
    cancel = threading.Event()
    steps = []

    def on_step(progress):
        steps.append(progress.step)
        if progress.step == 3:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        imagine(engine, "a red star on a green background --seed 5", on_step=on_step, cancel=cancel)
    assert steps == [1, 2, 3]
    assert len(imagine(engine, "a red star on a green background --seed 5 --n 1").images) == 1


def test_chaos_makes_images_differ_more(engine):
    calm = imagine(engine, "a white circle on a black background --seed 11")
    calm_again = imagine(engine, "a white circle on a black background --seed 11 --chaos 0")
    wild = imagine(engine, "a white circle on a black background --seed 11 --chaos 100")
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(calm.images, calm_again.images))
    assert np.mean([mean_abs_diff(a, b) for a, b in zip(calm.images, wild.images)]) > 1.0


def test_negative_prompt_changes_the_image(engine):
    plain = imagine(engine, "a circle on a background --seed 4 --n 1")
    negative = imagine(engine, "a circle on a background --seed 4 --n 1 --no red, blue")
    assert negative.settings.negative_prompt == "red, blue"
    assert mean_abs_diff(plain.images[0], negative.images[0]) > 1.0


def test_tile_makes_the_edges_wrap(engine):
    def seam(image):
        array = pixels(image)
        return np.abs(array[:, 0] - array[:, -1]).mean() + np.abs(array[0] - array[-1]).mean()

    plain = imagine(engine, "a purple triangle on an orange background, gradient style --seed 21")
    tiled = imagine(engine, "a purple triangle on an orange background, gradient style --seed 21 --tile")
    assert tiled.settings.tile
    assert np.mean([seam(i) for i in tiled.images]) < np.mean([seam(i) for i in plain.images])


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "lcm"])
def test_every_sampler_runs(engine, sampler):
    result = engine.imagine(ImagineRequest(prompt(f"a red circle --n 1 --steps 3 --seed 1 --sampler {sampler}")))
    assert result.settings.sampler == sampler and result.images[0].size == (64, 64)


def test_quality_scales_the_steps(engine):
    result = engine.imagine(ImagineRequest(prompt("a red circle --n 1 --q .25 --seed 1")))
    assert result.settings.steps == 5  # the starter default of 20 at a quarter


def test_stylize_maps_to_guidance(engine):
    literal = engine.imagine(ImagineRequest(prompt("a red circle --n 1 --steps 2 --s 0 --seed 1")))
    free = engine.imagine(ImagineRequest(prompt("a red circle --n 1 --steps 2 --s 1000 --seed 1")))
    explicit = engine.imagine(ImagineRequest(prompt("a red circle --n 1 --steps 2 --s 1000 --cfg 3 --seed 1")))
    assert literal.settings.cfg > 5.0 > free.settings.cfg  # the starter's default guidance is 5
    assert explicit.settings.cfg == 3


def test_multi_prompt_weights_change_the_image(engine):
    even = imagine(engine, "red circle:: blue background:: --seed 6 --n 1")
    weighted = imagine(engine, "red circle::3 blue background::1 --seed 6 --n 1")
    assert [p.weight for p in weighted.settings.parts] == [3.0, 1.0]
    assert mean_abs_diff(even.images[0], weighted.images[0]) > 0.5


def test_image_prompt_weight_pulls_toward_the_image(engine, grid):
    # Same colours, another shape: a heavier --iw keeps more of the image's composition.
    source = grid.images[0]
    heavy = [imagine(engine, f"a red square on a blue background --seed {s} --n 1 --iw 2.5", init_image=source)
             for s in (3, 4)]
    light = [imagine(engine, f"a red square on a blue background --seed {s} --n 1 --iw 0.5", init_image=source)
             for s in (3, 4)]
    assert heavy[0].settings.strength < light[0].settings.strength
    heavy_distance = np.mean([mean_abs_diff(r.images[0], source) for r in heavy])
    light_distance = np.mean([mean_abs_diff(r.images[0], source) for r in light])
    assert heavy_distance < light_distance


def test_async_callers_are_not_blocked(engine):
    async def scenario():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        result = await engine.imagine_async(ImagineRequest(prompt("a red circle --seed 1 --n 2 --steps 8")))
        stop.set()
        await task
        return ticks, result

    ticks, result = run(scenario())
    assert len(result.images) == 2 and ticks > 5


# -- bad input -------------------------------------------------------------------------------


def test_unknown_model_names_the_registered_ones(engine):
    with pytest.raises(UnknownModel, match="starter-shapes"):
        engine.imagine(ImagineRequest(prompt("a cat --model nope")))
    with pytest.raises(UnknownModel, match="does not exist"):
        engine.imagine(ImagineRequest(prompt("a cat --model /no/such/model.safetensors")))


def test_unknown_lora_and_missing_niji_model(engine, tmp_path):
    with pytest.raises(UnknownModel, match="Unknown LoRA 'watercolor'. Registered LoRAs: night, outline"):
        engine.imagine(ImagineRequest(prompt("a fox <lora:watercolor:0.5>")))
    assert engine.choose_model(prompt("a fox --niji")).name == "starter-niji"
    from engine.registry import load_registry
    from engine.routing import route

    bare = tmp_path / "models.toml"
    bare.write_text('[[models]]\nname = "m"\npath = "m"\nfamily = "starter"\n')
    with pytest.raises(UnknownModel, match="--niji needs a model tagged `niji`"):
        route(load_registry(bare), prompt("a fox --niji"))


def test_upscale_beyond_the_size_limit_is_refused(engine):
    from PIL import Image

    with pytest.raises(InvalidImage, match="limit"):
        engine.upscale(UpscaleRequest(Image.new("RGB", (4608, 64)), prompt("a cat")))


def test_memory_budget_evicts_the_least_recently_used_model(registry, tmp_path):
    from engine.models import estimate_bytes
    from engine.service import Engine
    import torch

    starter = registry.get("starter-shapes")
    copy_path = tmp_path / "starter-copy"
    shutil.copytree(starter.path, copy_path)
    copy = dataclasses.replace(starter, name="starter-copy", path=copy_path)
    size = estimate_bytes(starter, torch.float32)
    assert 2 * 2**20 < size < 60 * 2**20
    two_models = Registry({"starter-shapes": starter, "starter-copy": copy}, "starter-shapes")
    engine = Engine(two_models, tmp_path / "cache", device="cpu", memory_budget_bytes=int(size * 1.5))
    try:
        engine.imagine(ImagineRequest(prompt("a red circle --n 1 --steps 1 --seed 1")))
        engine.imagine(ImagineRequest(prompt("a red circle --n 1 --steps 1 --seed 1 --model starter-copy")))
        assert engine.cache.loaded() == [copy.key] and engine.cache.evictions == 1
        engine.imagine(ImagineRequest(prompt("a red circle --n 1 --steps 1 --seed 1 --model starter-copy")))
        assert engine.cache.loads == 2
    finally:
        engine.close()
    small = Engine(two_models, tmp_path / "cache", device="cpu", memory_budget_bytes=size // 2)
    try:
        with pytest.raises(ModelTooLarge, match="budget"):
            small.imagine(ImagineRequest(prompt("a red circle --n 1 --steps 1")))
        assert small.cache.loaded() == []
    finally:
        small.close()


def test_a_sampler_the_family_cannot_use_is_refused_before_loading(tmp_path):
    from engine.families import FAMILIES
    from engine.generation import resolve_settings

    spec = ModelSpec("flux-dev", tmp_path / "flux", "flux")
    with pytest.raises(InvalidPrompt, match="does not work with flux"):
        resolve_settings(prompt("a cat --sampler dpmpp_2m"), spec, FAMILIES["flux"])


def test_the_memory_estimate_counts_fp8_weights_at_their_loaded_size(tmp_path):
    """fp8 checkpoints (1 byte a weight on disk) are loaded in the compute dtype: fp16 takes 2 bytes, fp32 4."""
    import torch
    from safetensors.torch import save_file

    from engine.models import estimate_bytes
    from engine.registry import ModelSpec

    weights = tmp_path / "fp8.safetensors"
    save_file({"w": torch.zeros(1000, 1000).to(torch.float8_e4m3fn), "steps": torch.zeros(10, dtype=torch.int64)},
              str(weights))
    spec = ModelSpec(name="fp8", path=weights, family="sd15")
    assert estimate_bytes(spec, torch.float16) == 2 * 1_000_000 + 8 * 10
    assert estimate_bytes(spec, torch.float32) == 4 * 1_000_000 + 8 * 10
