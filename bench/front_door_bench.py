"""How fast `dreamloom serve --no-worker` (the gallery, no worker) answers and how small it stays, against the
all-in-one `dreamloom serve` in the same run. Prints JSON.

    .venv/bin/python bench/front_door_bench.py [--repeats 3]

Each start is a new process on a fresh SQLite data directory: the time from launch to the first 200 from
`/healthz`, its resident memory then, and whether torch's library is mapped into it. The all-in-one start also
loads the engine (and torch) before it answers.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import rss_mib  # noqa: E402

DREAMLOOM = Path(sys.executable).parent / "dreamloom"


def start_once(args: list[str]) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "DREAMLOOM_DATA_DIR": data, "DREAMLOOM_GALLERY_PORT": str(port), "HF_HUB_OFFLINE": "1",
               "DREAMLOOM_DEVICE": "cpu"}
        env.pop("DISCORD_TOKEN", None)
        started = time.monotonic()
        process = subprocess.Popen([str(DREAMLOOM), *args], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
            ready = time.monotonic() - started
            rss = rss_mib(process.pid)
            torch = "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {"ready_s": ready, "rss_mib": rss, "torch_loaded": torch}


def summary(runs: list[dict]) -> dict:
    return {"ready_s_median": round(statistics.median(r["ready_s"] for r in runs), 2),
            "rss_mib_median": round(statistics.median(r["rss_mib"] for r in runs)),
            "torch_loaded": any(r["torch_loaded"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    front = [start_once(["serve", "--no-worker"]) for _ in range(args.repeats)]
    whole = [start_once(["serve"]) for _ in range(args.repeats)]
    print(json.dumps({"serve_no_worker": summary(front), "serve_all_in_one": summary(whole)}, indent=2))


if __name__ == "__main__":
    main()
