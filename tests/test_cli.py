"""The `dreamloom` console script, run as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

DREAMLOOM = Path(sys.executable).parent / "dreamloom"


def run(*args: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DREAMLOOM_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "DREAMLOOM_DEVICE": "cpu"}
    env.pop("DREAMLOOM_CONFIG", None)
    result = subprocess.run([str(DREAMLOOM), *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def imagined(data_dir):
    result = run("imagine", "a red circle on a blue background --ar 3:2 --seed 7 --steps 10", "--json", data_dir=data_dir)
    return json.loads(result.stdout)


def test_imagine_writes_a_grid_and_four_images_with_parameters(imagined, data_dir):
    assert Path(imagined["grid"]).is_file() and Path(imagined["folder"]).parent == data_dir / "outputs"
    assert [i["seed"] for i in imagined["images"]] == [7, 8, 9, 10]
    assert imagined["parameters"]["width"] == 80 and imagined["parameters"]["height"] == 48
    grid = Image.open(imagined["grid"])
    assert grid.size == (160, 96)
    first = Image.open(imagined["images"][0]["path"])
    assert first.size == (80, 48)
    assert "Seed: 7, Size: 80x48, Model: starter-shapes" in first.info["parameters"]
    assert first.info["parameters"].startswith("a red circle on a blue background\n")


def test_human_output_prints_paths_and_parameters(data_dir):
    result = run("imagine", "a green star --seed 3 --n 1 --steps 4", "--quiet", data_dir=data_dir)
    assert "image 1:" in result.stdout and "(seed 3)" in result.stdout and "model starter-shapes" in result.stdout
    assert "grid:" not in result.stdout  # a single image needs no grid


def test_vary_reads_prompt_and_model_from_the_png(imagined, data_dir):
    source = imagined["images"][0]["path"]
    result = json.loads(run("vary", source, "--json", "--quiet", "--seed", "50", data_dir=data_dir).stdout)
    assert [i["seed"] for i in result["images"]] == [50, 51, 52, 53]
    assert result["parameters"]["prompt"] == "a red circle on a blue background"
    assert result["parameters"]["kind"] == "vary-subtle"
    assert Image.open(result["images"][0]["path"]).size == (80, 48)
    strong = json.loads(run("vary", source, "--strong", "--n", "2", "--json", "--quiet", data_dir=data_dir).stdout)
    assert len(strong["images"]) == 2 and strong["parameters"]["kind"] == "vary-strong"


def test_upscale_doubles_and_keeps_the_seed(imagined, data_dir):
    source = imagined["images"][1]["path"]
    result = json.loads(run("upscale", source, "--json", "--quiet", data_dir=data_dir).stdout)
    assert result["images"][0]["seed"] == 8
    assert Image.open(result["images"][0]["path"]).size == (160, 96)
    assert result["grid"] is None


def test_models_lists_the_starter(data_dir):
    listing = json.loads(run("models", "--json", data_dir=data_dir).stdout)
    assert listing["default"] == "starter-shapes"
    assert listing["models"][0]["installed"] is True


@pytest.mark.parametrize("args,fragment", [
    (["imagine", "a cat --chaos 500"], "--chaos takes a whole number from 0 to 100"),
    (["imagine", "a cat --model missing-model"], "Unknown model 'missing-model'"),
    (["imagine", "a cat", "--image", "/no/such.png"], "No image file"),
    (["upscale", "/etc/hostname"], "not a readable image"),
])
def test_bad_input_exits_2_with_a_message(args, fragment, data_dir):
    result = run(*args, data_dir=data_dir, check=False)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr
    as_json = run(*args, "--json", data_dir=data_dir, check=False)
    assert as_json.returncode == 2 and fragment in json.loads(as_json.stdout)["error"]
