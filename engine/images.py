"""Reading untrusted input images safely: size limits, real image formats, no decompression bombs."""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dreamloom.errors import InvalidImage

MAX_INPUT_BYTES = 20 * 2**20
MAX_INPUT_PIXELS = 4096 * 4096
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"  # what the messages name: the same list as ALLOWED_FORMATS


def open_image(data: bytes | Path, *, max_bytes: int = MAX_INPUT_BYTES, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Decode an input image to RGB, or raise `InvalidImage` saying what is wrong and the limits."""
    if isinstance(data, Path):
        if not data.is_file():
            raise InvalidImage(f"No image file at {data}.")
        if data.stat().st_size > max_bytes:
            raise InvalidImage(f"{data.name} is {data.stat().st_size / 2**20:.1f} MB; images may be at most {max_bytes / 2**20:.0f} MB.")
        data = data.read_bytes()
    if len(data) > max_bytes:
        raise InvalidImage(f"The image is {len(data) / 2**20:.1f} MB; images may be at most {max_bytes / 2**20:.0f} MB.")
    if not data:
        raise InvalidImage("The image file is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            width, height = probe.size
            if width * height > max_pixels:
                raise InvalidImage(
                    f"The image is {width}x{height} pixels; at most {max_pixels:,} pixels (e.g. 4096x4096) are accepted."
                )
            if probe.format not in ALLOWED_FORMATS:
                raise InvalidImage(f"{probe.format} images are not accepted; use {FORMAT_NAMES}.")
            probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
            if getattr(image, "info", None) is not None:
                parameters = {k: v for k, v in image.info.items() if k in ("parameters", "dreamloom")}
            image = image.convert("RGB")
            image.info.update(parameters)
            return image
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage(f"The image is too large to decode safely; at most {max_pixels:,} pixels are accepted.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidImage(f"The file is not a readable image; use {FORMAT_NAMES} (at most {max_bytes / 2**20:.0f} MB).") from None


def make_grid(images: list[Image.Image]) -> Image.Image:
    """Up to four images as a 2x2 grid (one image is returned as is; two side by side)."""
    if len(images) == 1:
        return images[0]
    columns = 2
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
