"""Prometheus metrics: `/metrics` on the gallery (what the database says: the queue, jobs by kind and status, live
workers, result-cache hits; and this process's own), and a `dreamloom worker`'s own on `metrics_port`.

Process metrics (latency histograms, model loads, embedding-cache hits) live where the work happens: the front door's
`/metrics` has them when it runs the worker too (`serve`), and each separate worker serves its own.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class ProcessMetrics:
    """This process's metrics: job latencies it observed, and its engine's model loads and caches."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queued_seconds = Histogram("dreamloom_job_queued_seconds", "Time from submit to start, by job kind.",
                                        ["kind"], buckets=_SECONDS, registry=self.registry)
        self.running_seconds = Histogram("dreamloom_job_running_seconds", "Time from start to done, by job kind.",
                                         ["kind"], buckets=_SECONDS, registry=self.registry)
        self.engine = None  # set by a worker: its engine's counters are read at each scrape
        self.registry.register(_EngineCollector(self))

    def observe_job(self, kind: str, queued_s: float, running_s: float) -> None:
        self.queued_seconds.labels(kind).observe(max(0.0, queued_s))
        self.running_seconds.labels(kind).observe(max(0.0, running_s))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, owner: ProcessMetrics) -> None:
        self.owner = owner

    def describe(self):
        return []

    def collect(self):
        engine = self.owner.engine
        if engine is None:
            return
        loads = CounterMetricFamily("dreamloom_model_loads", "Models loaded into memory by this worker.")
        loads.add_metric([], engine.cache.loads)
        evictions = CounterMetricFamily("dreamloom_model_evictions", "Models unloaded to make room.")
        evictions.add_metric([], engine.cache.evictions)
        stats = engine.embeddings.stats()
        embedding = CounterMetricFamily("dreamloom_embedding_cache", "Prompt-embedding cache lookups.", labels=["result"])
        embedding.add_metric(["hit"], stats["hits"])
        embedding.add_metric(["miss"], stats["misses"])
        yield from (loads, evictions, embedding)


def database_text(snapshot: dict[str, Any]) -> bytes:
    """The database's figures (`Studio.metrics_snapshot`) in the exposition format."""
    registry = CollectorRegistry()
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


class _SnapshotCollector:
    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        depth = GaugeMetricFamily("dreamloom_queue_depth", "Jobs waiting in the queue.")
        depth.add_metric([], self.snapshot["queued"])
        jobs = GaugeMetricFamily("dreamloom_jobs", "Jobs by kind and status.", labels=["kind", "status"])
        for (kind, status), count in sorted(self.snapshot["jobs"].items()):
            jobs.add_metric([kind, status], count)
        workers = GaugeMetricFamily("dreamloom_workers", "Workers heard from in the last three heartbeats.")
        workers.add_metric([], self.snapshot["workers"])
        hits = CounterMetricFamily("dreamloom_result_cache_hits", "Jobs answered from the result cache.")
        hits.add_metric([], self.snapshot["cache_hits"])
        yield from (depth, jobs, workers, hits)

