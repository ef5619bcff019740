"""Helpers shared by the benchmarks."""
from __future__ import annotations

import statistics
from pathlib import Path


def percentiles(samples: list[float]) -> dict:
    """p50 and p95 of durations in seconds, in milliseconds."""
    ordered = sorted(samples)
    return {"p50_ms": round(1000 * statistics.median(ordered), 3),
            "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 3), "n": len(ordered)}


async def done_count(settings) -> int:
    """How many jobs are done, read through a studio opened on `settings` (for benchmarks that watch workers run
    in other processes)."""
    from sqlalchemy import func, select

    from storage.models import Job
    from studio.service import Studio

    studio = await Studio.open(settings)
    try:
        async with studio.db.session() as session:
            return await session.scalar(select(func.count()).select_from(Job).where(Job.status == "done"))
    finally:
        await studio.close()


def rss_mib(pid: int) -> float:
    """A process's resident memory in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
