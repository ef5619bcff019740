"""LoRA switching vs reloading, and routing latency. Prints JSON.

    .venv/bin/python bench/lora_bench.py [--rounds 20]

1. Switching: the engine's way. Both kit LoRAs are loaded once as named adapters; each job activates one with
   `set_adapters` (what `engine.pipelines.activate_loras` does). Baseline in the same run: reloading the pipeline
   from disk and calling `load_lora_weights` with the other LoRA, as a naive server would.
2. Routing a prompt (its sentence embedding included) over the 42 prompts of tests/test_routing.py and two
   variants of each, p50 / p95; and routing the same prompt again (its embedding is kept).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import percentiles  # noqa: E402
from engine.cache import CacheEntry  # noqa: E402
from engine.models import load_pipeline  # noqa: E402
from engine.params import LoraChoice, parse_prompt  # noqa: E402
from engine.pipelines import activate_loras  # noqa: E402
from engine.registry import load_registry  # noqa: E402
from engine.routing import Embedder, route  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    registry = load_registry(ROOT / "models.toml")
    spec = registry.models["starter-shapes"]
    cache = Path(tempfile.mkdtemp())
    names = ["outline", "night"]

    entry = CacheEntry(load_pipeline(spec, args.device, torch.float32, cache), 0)
    activate_loras(entry, [LoraChoice(n, 1.0) for n in names], registry)  # both loaded once
    switch = []
    for index in range(args.rounds):
        started = time.perf_counter()
        activate_loras(entry, [LoraChoice(names[index % 2], 1.0)], registry)
        switch.append(time.perf_counter() - started)

    reload = []
    for index in range(max(3, args.rounds // 4)):
        started = time.perf_counter()
        pipe = load_pipeline(spec, args.device, torch.float32, cache)
        pipe.load_lora_weights(str(registry.lora(names[index % 2]).path), adapter_name=names[index % 2])
        reload.append(time.perf_counter() - started)
        del pipe

    sys.path.insert(0, str(ROOT / "tests"))
    from tests.test_routing import TABLE

    embedder = Embedder()
    route(registry, parse_prompt("warm up"), embedder)
    routing, repeated = [], []
    for variant in range(3):
        for text, _, _ in TABLE:
            text = text if variant == 0 else f"take {variant}: {text}"  # a new prompt: its embedding is computed
            started = time.perf_counter()
            route(registry, parse_prompt(text), embedder)
            routing.append(time.perf_counter() - started)
            started = time.perf_counter()
            route(registry, parse_prompt(text), embedder)  # the submit after a front door's check
            repeated.append(time.perf_counter() - started)
    switch_p = percentiles(switch)
    reload_p = percentiles(reload)
    print(json.dumps({
        "benchmark": "loras_and_routing", "device": args.device, "model": spec.name,
        "switch_loras": switch_p, "reload_pipeline_with_lora": reload_p,
        "speedup_median": round(reload_p["p50_ms"] / switch_p["p50_ms"], 1), "target_speedup": 20,
        "route_prompt": percentiles(routing), "route_target_p95_ms": 20,
        "route_same_prompt_again": percentiles(repeated),
    }, indent=2))


if __name__ == "__main__":
    main()
