"""Result cache and prompt-embedding cache: what each saves, measured in one run. Prints JSON.

    .venv/bin/python bench/cache_bench.py [--repeats 10]

1. Result cache, end to end in the studio (SQLite, a real worker on the starter model): a new request is submitted
   and run by the worker (submit to done: the full generation); the same request again is answered at submit time.
2. Embedding cache: the text encoder's time per job on a repeated prompt (new seeds each time, so every job
   generates), with the cache on and off, alternating, in the same process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import percentiles  # noqa: E402
from engine import pipelines  # noqa: E402
from engine.generation import ImagineRequest  # noqa: E402
from engine.params import parse_prompt  # noqa: E402
from engine.registry import load_registry  # noqa: E402
from engine.service import Engine  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402
from studio.worker import Worker  # noqa: E402

REGISTRY = ROOT / "models" / "models.toml"


async def result_cache(repeats: int, scratch: Path) -> dict:
    studio = await Studio.open(Settings(data_dir=scratch / "data", registry=REGISTRY))
    engine = Engine(studio.registry, scratch / "cache", device="cpu")
    worker = Worker(studio, engine, "bench:1:1")
    generated, hits = [], []
    try:
        await worker.run_one()  # nothing queued: warms the database
        for index in range(repeats):
            text = f"a red circle on a blue background --seed {1000 + index}"
            started = time.perf_counter()
            job = await studio.submit_imagine("cli:alice", text)
            await worker.run_one()
            assert (await studio.job(job.id)).status == "done"
            generated.append(time.perf_counter() - started)
            started = time.perf_counter()
            again = await studio.submit_imagine("cli:bob", text)
            hits.append(time.perf_counter() - started)
            assert again.status == "done" and again.cached_from_job_id == job.id
    finally:
        engine.close()
        await studio.close()
    return {"bench": "result_cache", "what": "submit to done, 2x2 grid of the starter model on CPU",
            "generated": percentiles(generated), "cache_hit": percentiles(hits),
            "speedup_p50": round(statistics.median(generated) / statistics.median(hits), 1)}


def embedding_cache(repeats: int, scratch: Path) -> dict:
    registry = load_registry(REGISTRY)
    engines = {"on": Engine(registry, scratch / "cache", device="cpu"),
               "off": Engine(registry, scratch / "cache", device="cpu", embedding_cache_size=0)}
    encoder_s = {"on": [], "off": []}
    job_s = {"on": [], "off": []}
    original = pipelines._encode_prompt

    def timed_encode(pipe, settings):
        started = time.perf_counter()
        try:
            return original(pipe, settings)
        finally:
            timed_encode.spent += time.perf_counter() - started

    timed_encode.spent = 0.0
    pipelines._encode_prompt = timed_encode
    try:
        text = "a yellow star on a white background, flat style, centered (bright:1.1)"
        for engine in engines.values():  # load both models before timing
            engine.imagine(ImagineRequest(parse_prompt(text + " --seed 1 --n 1 --steps 2")))
        for index in range(repeats):
            for name, engine in engines.items():
                timed_encode.spent = 0.0
                started = time.perf_counter()
                engine.imagine(ImagineRequest(parse_prompt(f"{text} --seed {100 + index}")))
                job_s[name].append(time.perf_counter() - started)
                encoder_s[name].append(timed_encode.spent)
    finally:
        pipelines._encode_prompt = original
        for engine in engines.values():
            engine.close()
    return {"bench": "embedding_cache", "what": "the same prompt, new seeds, starter model on CPU",
            "text_encoder_ms_per_job": {name: round(1000 * statistics.mean(values), 3) for name, values in encoder_s.items()},
            "job": {name: percentiles(values) for name, values in job_s.items()},
            "saved_ms_per_job": round(1000 * (statistics.mean(encoder_s["off"]) - statistics.mean(encoder_s["on"])), 3),
            "cache_stats": engines["on"].embeddings.stats()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        print(json.dumps(asyncio.run(result_cache(args.repeats, Path(scratch)))), flush=True)
        print(json.dumps(embedding_cache(args.repeats, Path(scratch))), flush=True)


if __name__ == "__main__":
    main()
