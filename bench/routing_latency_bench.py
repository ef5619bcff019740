"""Routing latency with 0, 1 000 and 10 000 learned examples on a server. Prints JSON.

    .venv/bin/python bench/routing_latency_bench.py [--repeats 2]

Each figure routes the routing table's 231 prompts (tuning and test parts) with a cold prompt cache, so every
call embeds its prompt (all-MiniLM-L6-v2 on the CPU) and scores it against the shipped examples plus the learned
ones (one matrix-vector product, then the top 3 per entry). The learned examples are random unit vectors spread
over the registry's entries: the cost of scoring does not depend on what they say. Also the embedding alone, as
the baseline in the same run, and each count again with the prompts' embeddings remembered (the scoring and the
decision alone: what grows with the learned examples).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.params import parse_prompt  # noqa: E402
from engine.registry import load_registry  # noqa: E402
from engine.routing import EMBEDDING_DIM, LearnedExamples, RouteExample, _default_embedder, prepare_routing, route  # noqa: E402
from tests.routing_table import TEST, TUNE  # noqa: E402


def learned_examples(registry, count: int, seed: int = 0) -> LearnedExamples:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, EMBEDDING_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    targets = [*registry.models, *registry.loras]
    now = time.time()
    return LearnedExamples([RouteExample(i, f"example {i}", targets[i % len(targets)], vectors[i].tobytes(),
                                         now - float(rng.uniform(0, 60)) * 86400) for i in range(count)])


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 2), "p95": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
            "max": round(ordered[-1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    registry = load_registry(ROOT / "tests" / "registry.toml")
    prepare_routing(registry)
    prompts = [parse_prompt(row[0]) for row in TUNE + TEST]
    embedder = _default_embedder
    embedder.embed("warm up")
    report = {"prompts": len(prompts), "repeats": args.repeats}
    embed_ms = []
    for _ in range(args.repeats):
        for prompt in prompts:
            embedder._recent.clear()
            started = time.perf_counter()
            embedder.embed(prompt.prompt)
            embed_ms.append((time.perf_counter() - started) * 1000)
    report["embedding_only_ms"] = percentiles(embed_ms)
    for count in (0, 1000, 10000):
        learned = learned_examples(registry, count) if count else None
        times = []
        for _ in range(args.repeats):
            for prompt in prompts:
                embedder._recent.clear()
                started = time.perf_counter()
                route(registry, prompt, learned=learned)
                times.append((time.perf_counter() - started) * 1000)
        report[f"route_ms_{count}_learned"] = percentiles(times)
        # The same prompts again: their embeddings remembered, so this is the scoring and the decision alone.
        warm = []
        for prompt in prompts:
            route(registry, prompt, learned=learned)
            started = time.perf_counter()
            route(registry, prompt, learned=learned)
            warm.append((time.perf_counter() - started) * 1000)
        report[f"scoring_ms_{count}_learned"] = percentiles(warm)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
