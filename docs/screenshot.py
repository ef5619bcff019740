"""Make docs/gallery.png, the README's screenshot: a real `dreamloom serve` with a few starter grids and votes,
photographed by headless Chromium.

    .venv/bin/python docs/screenshot.py [--out FILE] [--page PATH]     # a few minutes on a CPU
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402

PROMPTS = [
    "a black triangle on a red background --seed 3",
    "a purple square on a white background --seed 11",
    "an orange circle on a green background --seed 5",
    "a green triangle on an orange background --seed 8",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def fill(settings: Settings) -> None:
    studio = await Studio.open(settings)
    try:
        jobs = [await studio.submit_imagine(f"cli:artist{i}", prompt) for i, prompt in enumerate(PROMPTS)]
        for job in jobs:
            while (view := await studio.job(job.id)).status not in ("done", "failed", "cancelled"):
                await asyncio.sleep(0.5)
            for image in view.images[:3]:
                await studio.vote(image.id, "cli:critic", 1)
    finally:
        await studio.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery.png", help="the PNG to write")
    parser.add_argument("--page", default="/?period=all", help="the gallery page to photograph")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        data, port = Path(folder) / "data", free_port()
        settings = Settings(data_dir=data, registry=ROOT / "models.toml")
        env = {**os.environ, "DREAMLOOM_DATA_DIR": str(data), "DREAMLOOM_REGISTRY": str(ROOT / "models.toml"),
               "DREAMLOOM_GALLERY_PORT": str(port), "HF_HUB_OFFLINE": "1"}
        with open(Path(folder) / "serve.log", "wb") as log:
            server = subprocess.Popen([str(Path(sys.executable).parent / "dreamloom"), "serve"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise SystemExit("dreamloom serve did not start:\n" + (Path(folder) / "serve.log").read_text())
                    time.sleep(0.5)
            asyncio.run(fill(settings))
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.goto(f"http://127.0.0.1:{port}{args.page}")
                page.wait_for_function("() => [...document.images].every(img => img.complete && img.naturalWidth > 0)")
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=120)
    print(args.out)


if __name__ == "__main__":
    main()
