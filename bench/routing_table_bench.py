"""How often the router picks what a person would, on the routing table's tuning and test parts. Prints JSON.

    .venv/bin/python bench/routing_table_bench.py [--registry tests/registry.toml] [--misses]

`tests/routing_table.py` holds 151 prompts written as members write them, split before any tuning into TUNE (what
examples and margins may be set from) and TEST (reported, never tuned on). A row is right when both the model and
the set of LoRAs match. Also: routing latency per prompt (its sentence embedding included).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=ROOT / "tests" / "registry.toml")
    parser.add_argument("--misses", action="store_true", help="list the rows the router got wrong")
    args = parser.parse_args()
    registry = load_registry(args.registry)
    prepare_routing(registry)
    report = {"registry": str(args.registry)}
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
