"""Helpers shared by the benchmarks."""
from __future__ import annotations

import statistics


def percentiles(samples: list[float]) -> dict:
    """p50 and p95 of durations in seconds, in milliseconds."""
    ordered = sorted(samples)
    return {"p50_ms": round(1000 * statistics.median(ordered), 3),
            "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 3), "n": len(ordered)}
