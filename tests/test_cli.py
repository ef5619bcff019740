"""The `dreamloom` console script, run as a user runs it."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

DREAMLOOM = Path(sys.executable).parent / "dreamloom"


def run(*args: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DREAMLOOM_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "DREAMLOOM_DEVICE": "cpu"}
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
    assert re.search(r"Seed: 7, Size: 80x48, Model hash: [0-9a-f]{10}, Model: starter-shapes", first.info["parameters"])
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
    assert listing["registry"].endswith("tests/registry.toml")  # the tests' own, never the user's models.toml
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


def test_models_lists_models_and_loras(data_dir):
    text = run("models", data_dir=data_dir).stdout
    assert "starter-shapes" in text and "LoRAs:" in text
    assert "outline" in text and "trigger lineart" in text and "night" in text


def test_no_progress_lines_when_stderr_is_not_a_terminal(data_dir):
    result = run("imagine", "a blue square --seed 4 --n 1 --steps 6", data_dir=data_dir)
    assert "step" not in result.stderr  # a log file gets no line per step
    assert "LoRAs: none" in result.stdout and "took load" in result.stdout
    outlined = run("imagine", "a red star --lora outline --seed 4 --n 1 --steps 4", data_dir=data_dir)
    assert "LoRAs: outline:1" in outlined.stdout
    assert "No LoRA keys" not in outlined.stderr and "%|" not in outlined.stderr  # no library noise, no bars


def test_publish_puts_cli_results_in_the_gallery_with_their_lineage(data_dir):
    import asyncio

    from storage.gallery import GalleryQuery
    from studio.service import Studio
    from studio.settings import Settings

    made = json.loads(run("imagine", "a purple circle on a yellow background --seed 21 --steps 6", "--publish",
                          "--user", "demo", "--json", "--quiet", data_dir=data_dir).stdout)
    job_id, image_ids = made["published"]["job"], made["published"]["images"]
    assert len(image_ids) == 4 and made["published"]["gallery"].endswith(f"/image/{image_ids[0]}")
    varied = json.loads(run("vary", made["images"][2]["path"], "--n", "1", "--publish", "--user", "demo", "--json",
                            "--quiet", data_dir=data_dir).stdout)
    text = run("upscale", made["images"][0]["path"], "--publish", "--user", "demo", "--quiet", data_dir=data_dir).stdout
    assert "in the gallery as job" in text

    async def read():
        studio = await Studio.open(Settings(data_dir=data_dir))
        try:
            items, _ = await studio.showcase.gallery(GalleryQuery(period="all", per_page=50, user_id="cli:demo").check())
            lineage = await studio.showcase.lineage(image_ids[2])
            detail = await studio.showcase.image_detail(image_ids[0])
            return {item.image_id for item in items}, lineage, detail
        finally:
            await studio.close()

    listed, lineage, detail = asyncio.run(read())
    assert set(image_ids) | set(varied["published"]["images"]) <= listed
    assert [d["job_id"] for d in lineage["descendants"]] == [varied["published"]["job"]]
    assert detail["job_id"] == job_id and detail["user_id"] == "cli:demo" and detail["seed"] == 21
    png = Image.open(made["images"][0]["path"])
    assert str(data_dir) not in png.info["dreamloom"]  # a published file names no local path
    bad = run("imagine", "a cat", "--publish", "--user", "../etc", data_dir=data_dir, check=False)
    assert bad.returncode == 2 and "--user takes letters" in bad.stderr


def test_nothing_is_dropped_silently(data_dir, tmp_path):
    iw = run("imagine", "a cat --iw 2", data_dir=data_dir, check=False)
    assert iw.returncode == 2 and "--iw weighs an image prompt" in iw.stderr
    several = run("imagine", "a cat --foo 1 --bar --ar 2:1", data_dir=data_dir, check=False)
    assert several.returncode == 2 and "Unknown parameters --foo, --bar." in several.stderr
    foreign = tmp_path / "foreign.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(foreign)
    result = run("vary", str(foreign), data_dir=data_dir, check=False)
    assert result.returncode == 2 and "carries no prompt" in result.stderr and "--prompt" in result.stderr
    # An A1111 / ComfyUI PNG: its parameters text gives the prompt.
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a green star on a white background\nNegative prompt: blur\n"
                                "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64")
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(a1111, pnginfo=info)
    varied = json.loads(run("vary", str(a1111), "--n", "1", "--json", "--quiet", data_dir=data_dir).stdout)
    assert varied["parameters"]["prompt"] == "a green star on a white background"


def test_export_counts_in_words():
    from cli.main import _human

    one = _human("export", {"images": 1, "pairs": 1, "format": "pairs", "folder": "out"})
    assert one == "exported 1 image, 1 pair (pairs) to out"
    assert _human("export", {"images": 3, "pairs": 0, "format": "kohya", "folder": "out"}) == "exported 3 images (kohya) to out"


def test_the_screenshot_script_only_prints_help_with_help():
    picture = Path(__file__).resolve().parent.parent / "docs" / "gallery.png"
    before = picture.stat().st_mtime_ns
    result = subprocess.run([sys.executable, str(picture.parent / "screenshot.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--out" in result.stdout
    assert picture.stat().st_mtime_ns == before


CRAFTED = [
    {"dreamloom": '{"raw_prompt": "a cat", "seed": 1180591620717411303424}'},  # a seed past 2**64
    {"dreamloom": '{"raw_prompt": "a cat", "seed": -5, "settings": {"model": ["starter"]}}'},
    {"dreamloom": '{"raw_prompt": "a cat", "settings": {"model": "/etc"}}'},
    {"dreamloom": '{"raw_prompt": "a cat --steps 99999 --ar 500:1"}'},
    {"dreamloom": '{"raw_prompt": "' + "x" * 20000 + '"}'},
    {"dreamloom": '[1, 2, 3]'}, {"dreamloom": "null"}, {"dreamloom": "{not json"},
    {"parameters": "a cat\nSteps: many, Seed: 1e999, Size: 0x0, Model: ../../etc"},
    {"parameters": ""},
]


def test_crafted_png_metadata_gets_a_message_not_a_traceback(data_dir, tmp_path, monkeypatch, capsys):
    """`vary` and `upscale` on PNGs with hostile metadata: a result or exit code 2 with a message, never an exception
    escaping the command (a traceback). In process: the same entry point as the console script, without starting
    Python twenty times."""
    from PIL import PngImagePlugin

    from cli.main import main

    monkeypatch.setenv("DREAMLOOM_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DREAMLOOM_DEVICE", "cpu")
    for index, chunks in enumerate(CRAFTED):
        info = PngImagePlugin.PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
        path = tmp_path / f"crafted-{index}.png"
        Image.new("RGB", (32, 32), "red").save(path, pnginfo=info)
        for command in ("vary", "upscale"):
            code = main([command, str(path), "--quiet"])
            err = capsys.readouterr().err
            assert code in (0, 2), chunks
            assert code == 0 or (err.startswith("error: ") and "Traceback" not in err), (chunks, err)


def test_vary_refuses_a_sliver_instead_of_allocating_gigabytes(data_dir, tmp_path):
    sliver = tmp_path / "sliver.png"
    Image.new("L", (16_000_000, 1)).save(sliver)
    result = run("vary", str(sliver), "--prompt", "a line", data_dir=data_dir, check=False)
    assert result.returncode == 2 and "Downscale it first" in result.stderr, result.stderr[-2000:]


def test_the_cli_loads_a_model_from_a_path_but_not_pickled_weights(data_dir, tmp_path):
    import shutil

    folder = tmp_path / "pickled-model"
    shutil.copytree(Path(__file__).parent.parent / "models" / "starter-shapes", folder)
    # The owner's CLI loads a model from a path (members name registered models only)...
    made = json.loads(run("imagine", "a cat --steps 2 --n 1", "--model", str(folder), "--json", "--quiet",
                          data_dir=data_dir).stdout)
    assert made["parameters"]["model"] == "pickled-model" and len(made["images"]) == 1
    # ...but not one whose weights are pickles.
    for weights in folder.rglob("*.safetensors"):
        weights.with_suffix(".bin").write_bytes(b"pickle would run here")
        weights.unlink()
    result = run("imagine", "a cat --steps 2", "--model", str(folder), data_dir=data_dir, check=False)
    assert result.returncode == 2 and "pickled weights" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr[-2000:]


def test_the_owner_bans_a_member_and_purges_their_votes(data_dir):
    made = json.loads(run("imagine", "a blue circle --seed 4 --steps 2 --n 1", "--publish", "--user", "owner", "--json",
                          "--quiet", data_dir=data_dir).stdout)
    image = str(made["published"]["images"][0])
    run("vote", image, "+1", "--user", "discord:77", data_dir=data_dir)
    assert "2 up" in run("vote", image, "+1", "--user", "discord:78", data_dir=data_dir).stdout
    assert run("ban", "discord:77", "--purge-votes", data_dir=data_dir).stdout.strip() == "discord:77 is banned; 1 vote removed"
    assert "1 up" in run("vote", image, "+1", "--user", "discord:78", data_dir=data_dir).stdout
    refused = run("vote", image, "+1", "--user", "discord:77", data_dir=data_dir, check=False)
    assert refused.returncode == 2 and "banned" in refused.stderr
    assert "may generate and vote again" in run("ban", "discord:77", "--unban", data_dir=data_dir).stdout
