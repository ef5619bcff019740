"""Untrusted input images, PNG metadata, the registry file and the settings object."""
from __future__ import annotations

import io
import zlib
import struct

import pytest
from PIL import Image

from dreamloom.errors import ConfigError, InvalidImage
from engine.generation import GenerationSettings
from engine.images import make_grid, open_image
from engine.metadata import a1111_parameters, png_bytes, read_parameters
from engine.params import LoraChoice, WeightedPrompt
from engine.registry import load_registry


def _png(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size, with a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_a_real_image_opens_as_rgb():
    image = open_image(_png())
    assert image.mode == "RGB" and image.size == (8, 8)


@pytest.mark.parametrize("data,fragment", [
    (b"", "empty"),
    (b"just some text, not an image", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
    (_bomb_png(50000, 50000), "pixels"),
    (_bomb_png(5000, 5000), "pixels"),
])
def test_bad_images_are_refused_with_a_reason(data, fragment):
    with pytest.raises(InvalidImage, match=fragment):
        open_image(data)


def test_huge_uploads_and_missing_files_are_refused(tmp_path):
    with pytest.raises(InvalidImage, match="at most 1 MB"):
        open_image(b"\x00" * (2 * 2**20), max_bytes=2**20)
    with pytest.raises(InvalidImage, match="No image file"):
        open_image(tmp_path / "missing.png")
    big = tmp_path / "big.png"
    big.write_bytes(_png() + b"\x00" * (2 * 2**20))
    with pytest.raises(InvalidImage, match="at most 1 MB"):
        open_image(big, max_bytes=2**20)


def test_unsupported_format_is_refused():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="TIFF")
    with pytest.raises(InvalidImage, match="TIFF"):
        open_image(buffer.getvalue())


def _settings(**overrides) -> GenerationSettings:
    values = dict(model="starter-shapes", family="starter", prompt="a red circle", parts=(WeightedPrompt("a red circle", 1.0),),
                  negative_prompt="blue, green", width=96, height=64, seeds=(7, 8), steps=20, cfg=7.5,
                  sampler="dpmpp_2m_karras", chaos=30, stylize=100, tile=True)
    values.update(overrides)
    return GenerationSettings(**values)


def test_png_carries_a1111_parameters_that_read_back():
    text = a1111_parameters(_settings(), seed=8)
    assert text.splitlines()[0] == "a red circle"
    assert text.splitlines()[1] == "Negative prompt: blue, green"
    assert "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 8, Size: 96x64, Model: starter-shapes" in text
    data = png_bytes(Image.new("RGB", (96, 64)), text, {"seed": 8})
    image = Image.open(io.BytesIO(data))
    assert image.info["parameters"] == text
    parsed = read_parameters(image)
    assert parsed["prompt"] == "a red circle" and parsed["negative_prompt"] == "blue, green"
    assert parsed["Seed"] == "8" and parsed["Sampler"] == "DPM++ 2M Karras" and parsed["Chaos"] == "30"
    assert parsed["dreamloom"] == {"seed": 8}


def test_a1111_text_with_a_multi_line_negative_prompt_and_quoted_values_reads_as_a1111_reads_it():
    from engine.metadata import parse_a1111_text

    text = ("masterpiece, a castle\nat dusk\nNegative prompt: blurry,\nlow quality, watermark\n"
            'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 832x1216, Model hash: 4d1a7c2e3f, '
            'Lora hashes: "outline: 0123456789ab, night: ba9876543210", Version: v1.10.1')
    parsed = parse_a1111_text(text)
    assert parsed["prompt"] == "masterpiece, a castle\nat dusk"
    assert parsed["negative_prompt"] == "blurry,\nlow quality, watermark"
    assert parsed["Lora hashes"] == "outline: 0123456789ab, night: ba9876543210"
    assert parsed["Model hash"] == "4d1a7c2e3f" and parsed["Seed"] == "42" and parsed["Version"] == "v1.10.1"
    assert parse_a1111_text("just a prompt, no settings") == {"prompt": "just a prompt, no settings",
                                                             "negative_prompt": ""}


def test_loras_are_written_as_a1111_prompt_tags():
    text = a1111_parameters(_settings(loras=(LoraChoice("outline", 0.8), LoraChoice("night", 1.0))), seed=8)
    assert text.splitlines()[0] == "a red circle <lora:outline:0.8> <lora:night:1>"
    assert "Steps: 20" in text.splitlines()[-1]


def test_multi_prompt_is_written_with_weights():
    settings = _settings(parts=(WeightedPrompt("hot", 1.0), WeightedPrompt("dog", 2.0)), prompt="hot, dog", negative_prompt="")
    text = a1111_parameters(settings, seed=1)
    assert text.splitlines()[0] == "hot::1 dog::2" and "Negative prompt" not in text


def test_grid_layout():
    images = [Image.new("RGB", (10, 6), c) for c in ("red", "green", "blue", "white")]
    grid = make_grid(images)
    assert grid.size == (20, 12)
    assert grid.getpixel((15, 9)) == (255, 255, 255)
    assert make_grid(images[:1]) is images[0]


@pytest.mark.parametrize("body,fragment", [
    ('[[models]]\nname = "a"\npath = "x"\nfamily = "sd3"\n', "family must be one of"),
    ('[[models]]\nname = "a"\nfamily = "sd15"\n', "'path'"),
    ('[[models]]\nname = "a"\npath = "x"\nfamily = "sd15"\ncolour = "red"\n', "unknown field(s) colour"),
    ('[[models]]\nname = "a"\npath = "x"\nfamily = "sd15"\n[[models]]\nname = "a"\npath = "y"\nfamily = "sd15"\n', "used twice"),
    ('default = "b"\n[[models]]\nname = "a"\npath = "x"\nfamily = "sd15"\n', "default model 'b'"),
    ('[[models]]\nname = "a"\npath = "x"\nfamily = "sd15"\n[models.defaults]\nsteps = 0\n', "defaults.steps"),
    ('[[models]]\nname = "a"\npath = "x"\nfamily = "sd15"\n[models.defaults]\nspeed = 3\n', "unknown default(s) speed"),
    ("models = [ this is not toml", "not valid TOML"),
    ('[[models]]\nname = "my model"\npath = "x"\nfamily = "sd15"\n', "model 'my model': a name may only use"),
    ('[[loras]]\nname = "a/b"\npath = "x"\nfamily = "sd15"\n', "LoRA 'a/b': a name may only use"),
])
def test_bad_registry_entries_name_the_entry_and_field(tmp_path, body, fragment):
    path = tmp_path / "models.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_registry(path)
    assert fragment in str(caught.value)


def test_missing_registry_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "nope.toml")):
        load_registry(tmp_path / "nope.toml")


def test_registry_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "a"\npath = "weights/a.safetensors"\nfamily = "sd15"\ntags = ["photo"]\n')
    registry = load_registry(path)
    assert registry.default == "a" and registry.get("a").path == tmp_path / "weights" / "a.safetensors"


def test_settings_from_environment_and_toml(tmp_path, monkeypatch):
    from studio.settings import load_settings

    config = tmp_path / "dreamloom.toml"
    config.write_text(f'data_dir = "{tmp_path / "from-toml"}"\nmodel_memory_budget_mb = 512\n')
    monkeypatch.setenv("DREAMLOOM_CONFIG", str(config))
    settings = load_settings()
    assert settings.data_dir == tmp_path / "from-toml" and settings.model_memory_budget_mb == 512
    monkeypatch.setenv("DREAMLOOM_DATA_DIR", str(tmp_path / "from-env"))
    assert load_settings().data_dir == tmp_path / "from-env"
    monkeypatch.setenv("DREAMLOOM_MODEL_MEMORY_BUDGET_MB", "-3")
    with pytest.raises(ConfigError, match="model_memory_budget_mb"):
        load_settings()
    monkeypatch.setenv("DREAMLOOM_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_image_messages_name_every_accepted_format():
    from engine.images import open_image

    with pytest.raises(InvalidImage) as error:
        open_image(b"not an image at all")
    assert "PNG, JPEG, WebP, GIF or BMP" in str(error.value)
