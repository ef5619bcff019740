"""An LRU cache of loaded pipelines, bounded by a memory budget, under one GPU lock."""
from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dreamloom.errors import ModelTooLarge
from engine.registry import ModelSpec


@dataclass
class CacheEntry:
    """A loaded pipeline, its estimated size, and pipelines derived from it (img2img)."""

    pipe: Any
    size: int
    derived: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters loaded into `pipe`: name -> file
    embeddings: ScopedEmbeddings | None = None  # the prompt-embedding cache for this model (None: off)
    name: str = ""  # the model's name (status and heartbeats show it)


class ModelCache:
    """Keeps recently used pipelines loaded; evicts the least recently used to stay within `budget_bytes`.

        with cache.acquire(spec) as entry:
            entry.pipe(...)

    `acquire` holds the single GPU lock for the whole `with` block, so only one
    generation touches the accelerator at a time.
    """

    def __init__(
        self,
        load: Callable[[ModelSpec], Any],
        estimate: Callable[[ModelSpec], int],
        budget_bytes: int,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self._load = load
        self._estimate = estimate
        self._release = release
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.lock = threading.RLock()
        self.loads = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        """Sum of the estimated sizes of the loaded pipelines."""
        return sum(entry.size for entry in self._entries.values())

    def loaded(self) -> list[str]:
        """Cache keys, least recently used first."""
        return list(self._entries)

    def loaded_names(self) -> list[str]:
        """The loaded models' names, least recently used first."""
        return [entry.name for entry in list(self._entries.values())]

    def _evict_one(self) -> None:
        self._entries.popitem(last=False)
        self.evictions += 1
        gc.collect()
        self._release()

    @contextmanager
    def acquire(self, spec: ModelSpec) -> Iterator[CacheEntry]:
        """Hold the GPU lock and yield the loaded entry for `spec`, loading it if needed."""
        with self.lock:
            entry = self._entries.get(spec.key)
            if entry is None:
                size = self._estimate(spec)
                if size > self.budget_bytes:
                    raise ModelTooLarge(
                        f"Model {spec.name!r} needs about {size / 2**30:.1f} GiB but the model memory budget is "
                        f"{self.budget_bytes / 2**30:.1f} GiB; raise DREAMLOOM_MODEL_MEMORY_BUDGET_MB or use a smaller model."
                    )
                while self._entries and self.used_bytes + size > self.budget_bytes:
                    self._evict_one()
                entry = CacheEntry(self._load(spec), size, name=spec.name)
                self.loads += 1
                self._entries[spec.key] = entry
            self._entries.move_to_end(spec.key)
            yield entry

    def clear(self) -> None:
        """Unload everything."""
        with self.lock:
            while self._entries:
                self._evict_one()


class PromptEmbeddingCache:
    """Prompt embeddings reused across jobs: an LRU of at most `capacity` entries (0 turns it off).

    Keys are built by the caller and scoped per model (`scope`): the text, the multi-prompt weights, the negative
    prompt, clip skip, the LoRAs and their weights (a LoRA may change the text encoder) and which text encoder
    (base or refiner). Values are the tensors before --chaos, which depends on the seeds.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, tuple[dict, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.saved_seconds = 0.0  # text-encoder time the hits did not spend (as measured when each was computed)

    def scope(self, model_key: str) -> ScopedEmbeddings | None:
        """This cache seen from one model; None when the cache is off."""
        return ScopedEmbeddings(self, model_key) if self.capacity > 0 else None

    def get(self, key: tuple) -> dict | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            self.saved_seconds += found[1]
            return found[0]

    def put(self, key: tuple, value: dict, seconds: float) -> None:
        with self._lock:
            self._entries[key] = (value, seconds)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, float]:
        """Hits, misses, entries and the text-encoder seconds saved."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries),
                    "saved_s": round(self.saved_seconds, 4)}


@dataclass(frozen=True)
class ScopedEmbeddings:
    """A PromptEmbeddingCache whose keys start with one model's identity."""

    cache: PromptEmbeddingCache
    model_key: str

    def get(self, key: tuple) -> dict | None:
        return self.cache.get((self.model_key, *key))

    def put(self, key: tuple, value: dict, seconds: float) -> None:
        self.cache.put((self.model_key, *key), value, seconds)
