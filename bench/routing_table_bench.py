"""How often the router picks what a person would, on the routing table's tuning and test parts. Prints JSON.

    .venv/bin/python bench/routing_table_bench.py [--registry tests/registry.toml] [--misses] [--calibrate]

`tests/routing_table.py` holds 231 prompts written as members write them: TUNE (151, what examples and margins may
be set from) and TEST (80, written before the examples and margins, reported, never tuned on). A row is right when both the model and
the set of LoRAs match. Also: routing latency per prompt (its sentence embedding included).

`--calibrate` fits the two margins of models.toml's [routing] on the tuning part alone: every pair on a grid, the
pairs that route it best, and their middle (the values to write into models.toml); the test part is then routed
once with them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.params import parse_prompt  # noqa: E402
from engine.registry import load_registry  # noqa: E402
from engine.routing import prepare_routing, route  # noqa: E402
from tests.routing_table import TEST, TUNE  # noqa: E402


def score(registry, table) -> tuple[float, list[dict], list[float]]:
    right, misses, latencies = 0, [], []
    for prompt, model, loras in table:
        started = time.perf_counter()
        decision = route(registry, parse_prompt(prompt))
        latencies.append((time.perf_counter() - started) * 1000)
        got = (decision.model, sorted(lora.name for lora in decision.loras))
        if got == (model, sorted(loras)):
            right += 1
        else:
            misses.append({"prompt": prompt, "got": got, "want": (model, sorted(loras))})
    return right / len(table), misses, latencies


def calibrate(registry) -> dict:
    """The margins that route the tuning part best: the middle of the best pairs on a 0.01 grid."""
    grid = [round(0.01 * i, 2) for i in range(-5, 21)]
    results = []
    for model_margin in grid:
        for lora_margin in grid:
            registry.routing.update(model_margin=model_margin, lora_margin=lora_margin)
            results.append((score(registry, TUNE)[0], model_margin, lora_margin))
    best = max(r[0] for r in results)
    winners = [r for r in results if r[0] == best]
    middle = (statistics.median(r[1] for r in winners), statistics.median(r[2] for r in winners))
    chosen = min(winners, key=lambda r: (r[1] - middle[0]) ** 2 + (r[2] - middle[1]) ** 2)
    registry.routing.update(model_margin=chosen[1], lora_margin=chosen[2])
    return {"tune_accuracy": round(best, 4), "best_pairs": len(winners),
            "model_margin_range": [min(r[1] for r in winners), max(r[1] for r in winners)],
            "lora_margin_range": [min(r[2] for r in winners), max(r[2] for r in winners)],
            "model_margin": chosen[1], "lora_margin": chosen[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=ROOT / "tests" / "registry.toml")
    parser.add_argument("--misses", action="store_true", help="list the rows the router got wrong")
    parser.add_argument("--calibrate", action="store_true", help="fit model_margin and lora_margin on the tuning part")
    args = parser.parse_args()
    registry = load_registry(args.registry)
    prepare_routing(registry)
    report = {"registry": str(args.registry)}
    if args.calibrate:
        report["calibrated"] = calibrate(registry)
    report["margins"] = {key: registry.routing.get(key) for key in ("model_margin", "lora_margin", "top_k")}
    for name, table in (("tune", TUNE), ("test", TEST)):
        accuracy, misses, latencies = score(registry, table)
        report[name] = {"rows": len(table), "accuracy": round(accuracy, 4),
                        "latency_ms": {"p50": round(statistics.median(latencies), 2),
                                       "p95": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 2)}}
        if args.misses:
            report[name]["misses"] = misses
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
