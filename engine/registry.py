"""The model registry: which checkpoints exist, where, and of which family (`models.toml`).

    default = "starter-shapes"

    [[models]]
    name = "starter-shapes"
    path = "models/starter-shapes"      # relative to this file
    family = "starter"                   # starter | sd15 | sdxl | flux
    description = "flat coloured shapes"

Paths are relative to the registry file. A `--model` that is not a registered
name may be a path to a checkpoint file or diffusers folder.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamloom.errors import ConfigError, UnknownModel
from engine.detect import detect_family
from engine.families import FAMILIES

_DEFAULT_FIELDS = {"steps", "sampler", "cfg", "size"}
_MODEL_FIELDS = {"name", "path", "family", "config", "description", "tags", "triggers", "keywords", "examples", "defaults",
                 "vae", "clip_skip", "prediction_type", "zero_terminal_snr", "variant", "refiner", "refiner_switch"}
_EMBEDDING_FIELDS = {"name", "path", "family", "description"}
_ROUTING_FIELDS = {"max_loras", "model_margin", "lora_margin", "top_k"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
_LORA_FIELDS = {"name", "path", "family", "description", "tags", "triggers", "keywords", "examples", "weight", "group"}


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint the engine can load: a diffusers folder or a single `.safetensors` file."""

    name: str
    path: Path
    family: str
    config: Path | None = None  # diffusers config folder for a single file (else the shipped one)
    description: str = ""
    tags: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    triggers: tuple[str, ...] = ()  # words that select this model when a prompt contains them
    keywords: tuple[str, ...] = ()  # weaker hints, checked after every entry's trigger words
    # Prompts in this model's style, as members write them: routing compares new prompts with them. The default
    # model's examples stand for prompts in no special style.
    examples: tuple[str, ...] = ()
    vae: Path | None = None  # a VAE to use instead of the checkpoint's own (file or diffusers folder)
    clip_skip: int = 1  # A1111's "Clip skip": 1 reads the text encoder's last layer, 2 the one before it
    prediction_type: str | None = None  # "v_prediction" for v-pred checkpoints (else the checkpoint's own)
    zero_terminal_snr: bool = False  # v-pred models trained with zero terminal SNR (e.g. NoobAI-XL v-pred)
    variant: str | None = None  # a diffusers folder's weight variant, e.g. "fp16"
    refiner: Path | None = None  # an SDXL refiner (file or folder) that finishes text-to-image runs
    refiner_switch: float = 0.8  # the fraction of the steps the base model runs before the refiner takes over
    embeddings: tuple["EmbeddingSpec", ...] = ()  # textual inversions of this family, used by name in prompts

    @property
    def key(self) -> str:
        """Identity in the model cache: what is loaded, not only from where."""
        extras = [str(self.vae.resolve()) if self.vae else "", str(self.refiner.resolve()) if self.refiner else "",
                  self.prediction_type or "", str(self.zero_terminal_snr),
                  self.variant or "", ",".join(f"{e.name}={e.path.resolve()}" for e in self.embeddings)]
        return f"{self.family}:{self.path.resolve()}:" + "|".join(extras)


@dataclass(frozen=True)
class EmbeddingSpec:
    """A textual-inversion embedding (A1111's `embeddings/` files): its name is the word that invokes it."""

    name: str
    path: Path
    family: str
    description: str = ""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file (diffusers/peft or kohya/A1111 layout) for models of one family."""

    name: str
    path: Path
    family: str
    description: str = ""
    tags: tuple[str, ...] = ()
    triggers: tuple[str, ...] = ()  # added to the prompt when missing: the LoRA was trained with them
    keywords: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()  # prompts this LoRA suits, as members write them (routing compares with them)
    weight: float = 0.8
    group: str | None = None  # LoRAs of one group conflict (e.g. two palettes): at most one is applied


@dataclass(frozen=True)
class Registry:
    """The registered models and the default one."""

    models: dict[str, ModelSpec]
    default: str
    source: Path | None = None
    loras: dict[str, LoraSpec] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)  # max_loras, model_margin, lora_margin, top_k

    def lora(self, name: str) -> LoraSpec:
        """The LoRA called `name`; unknown names list the registered ones."""
        if name in self.loras:
            return self.loras[name]
        known = ", ".join(sorted(self.loras)) or "none (add [[loras]] entries to models.toml)"
        raise UnknownModel(f"Unknown LoRA {name!r}. Registered LoRAs: {known}.")

    def get(self, name: str) -> ModelSpec:
        """The model called `name`; unknown names list the registered ones."""
        if name in self.models:
            return self.models[name]
        raise UnknownModel(f"Unknown model {name!r}. Registered models: {', '.join(sorted(self.models)) or 'none'}.")

    def resolve(self, name_or_path: str | None, *, allow_paths: bool = True) -> ModelSpec:
        """A registered name, a path to a checkpoint (`allow_paths`, the owner's CLI), or the default when `None`.

        With `allow_paths=False` (prompts from Discord and the web) only registered names are taken, and the
        message for anything else is the same whatever exists on disk, so it tells nothing about the filesystem.
        """
        if not name_or_path:
            return self.get(self.default)
        if name_or_path in self.models:
            return self.models[name_or_path]
        looks_like_path = (any(sep in name_or_path for sep in ("/", "\\", "~")) or name_or_path.startswith(".")
                           or name_or_path.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".gguf")))
        if not allow_paths and not looks_like_path:
            return self.get(name_or_path)
        if not allow_paths:
            raise UnknownModel("--model takes the name of a registered model "
                               f"({', '.join(sorted(self.models)) or 'none'}); models from files are added by the "
                               "server's owner.")
        try:
            path = Path(name_or_path).expanduser()
            exists = path.exists()
        except (OSError, RuntimeError, ValueError):  # a name too long, `~nosuchuser`, a NUL byte
            exists = False
        if exists:
            return ModelSpec(name=path.stem if path.is_file() else path.name, path=path, family=detect_family(path))
        if looks_like_path:
            raise UnknownModel(f"No checkpoint at {name_or_path!r}: the file or folder does not exist.")
        return self.get(name_or_path)


_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _words(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: {key} must be a list of non-empty strings.")
    return tuple(v.strip() for v in value)


MAX_EXAMPLES = 200  # per entry: routing embeds them all when models.toml is read
MAX_EXAMPLE_CHARS = 300


def _examples(raw: dict[str, Any], where: str) -> tuple[str, ...]:
    examples = _words(raw, "examples", where)
    if len(examples) > MAX_EXAMPLES or any(len(e) > MAX_EXAMPLE_CHARS for e in examples):
        raise ConfigError(f"{where}: at most {MAX_EXAMPLES} examples of up to {MAX_EXAMPLE_CHARS} characters each.")
    return examples


def _checked(raw: Any, index: int, table: str, kind: str, fields: set[str]) -> str:
    """The checks every [[models]] and [[loras]] entry shares; returns how messages name the entry."""
    where = f"models.toml: [[{table}]] entry {index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table.")
    unknown = set(raw) - fields
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(fields))}.")
    for required in ("name", "path", "family"):
        if not isinstance(raw.get(required), str) or not raw[required].strip():
            raise ConfigError(f"{where} needs a non-empty text field {required!r}.")
    where = f"models.toml: {kind} {raw['name']!r}"
    if not _NAME.fullmatch(raw["name"]):
        # Names appear in prompts (--model, --lora name:weight), gallery URLs and Discord choices.
        raise ConfigError(f"{where}: a name may only use letters, digits, '.', '_' and '-' (up to 100 characters).")
    if raw["family"] not in FAMILIES:
        raise ConfigError(f"{where}: family must be one of {', '.join(FAMILIES)}; got {raw['family']!r}.")
    return where


def _relative_to(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _lora_entry(raw: dict[str, Any], index: int, base: Path) -> LoraSpec:
    where = _checked(raw, index, "loras", "LoRA", _LORA_FIELDS)
    weight = raw.get("weight", 0.8)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not -2 <= weight <= 2:
        raise ConfigError(f"{where}: weight must be a number from -2 to 2.")
    group = raw.get("group")
    if group is not None and not isinstance(group, str):
        raise ConfigError(f"{where}: group must be a string.")
    return LoraSpec(name=raw["name"], path=_relative_to(base, raw["path"]), family=raw["family"],
                    description=str(raw.get("description", "")), tags=_words(raw, "tags", where),
                    triggers=_words(raw, "triggers", where), keywords=_words(raw, "keywords", where),
                    examples=_examples(raw, where), weight=float(weight), group=group)


def _embedding_entry(raw: dict[str, Any], index: int, base: Path) -> EmbeddingSpec:
    where = _checked(raw, index, "embeddings", "embedding", _EMBEDDING_FIELDS)
    path = _relative_to(base, raw["path"])
    if path.suffix != ".safetensors":
        raise ConfigError(f"{where}: embeddings are loaded from .safetensors files only (pickled .pt files can run "
                          "code); convert it first.")
    return EmbeddingSpec(name=raw["name"], path=path, family=raw["family"], description=str(raw.get("description", "")))


def _entry(raw: dict[str, Any], index: int, base: Path) -> ModelSpec:
    where = _checked(raw, index, "models", "model", _MODEL_FIELDS)
    name = raw["name"]
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"{where}: tags must be a list of strings.")
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: defaults must be a table.")
    unknown_defaults = set(defaults) - _DEFAULT_FIELDS
    if unknown_defaults:
        raise ConfigError(f"{where}: unknown default(s) {', '.join(sorted(unknown_defaults))}; known: {', '.join(sorted(_DEFAULT_FIELDS))}.")
    for key in ("steps", "size"):
        if key in defaults and (not isinstance(defaults[key], int) or defaults[key] < 1):
            raise ConfigError(f"{where}: defaults.{key} must be a positive whole number.")
    if "cfg" in defaults and not (isinstance(defaults["cfg"], (int, float)) and 1 <= defaults["cfg"] <= 30):
        raise ConfigError(f"{where}: defaults.cfg must be a number from 1 to 30.")
    clip_skip = raw.get("clip_skip", 1)
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= 12:
        raise ConfigError(f"{where}: clip_skip is A1111's Clip skip, a whole number from 1 (no skip) to 12; "
                          f"2 is usual for anime models.")
    prediction_type = raw.get("prediction_type")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{where}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}.")
    zero_terminal_snr = raw.get("zero_terminal_snr", False)
    if not isinstance(zero_terminal_snr, bool):
        raise ConfigError(f"{where}: zero_terminal_snr must be true or false.")
    for key in ("vae", "variant", "refiner"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise ConfigError(f"{where}: {key} must be a non-empty text.")
    if raw["family"] == "flux" and (raw.get("vae") or clip_skip != 1 or prediction_type):
        raise ConfigError(f"{where}: vae, clip_skip and prediction_type apply to SD1.5 and SDXL models, not FLUX.")
    if (raw.get("refiner") or "refiner_switch" in raw) and raw["family"] != "sdxl":
        raise ConfigError(f"{where}: a refiner is a second stage of SDXL models; this model is {raw['family']}.")
    switch = raw.get("refiner_switch", 0.8)
    if not isinstance(switch, (int, float)) or isinstance(switch, bool) or not 0.5 <= switch <= 0.95:
        raise ConfigError(f"{where}: refiner_switch is the fraction of steps before the refiner, from 0.5 to 0.95.")
    return ModelSpec(
        name=name, path=_relative_to(base, raw["path"]), family=raw["family"],
        config=_relative_to(base, raw["config"]) if raw.get("config") else None,
        description=str(raw.get("description", "")), tags=tuple(tags), defaults=dict(defaults),
        triggers=_words(raw, "triggers", where), keywords=_words(raw, "keywords", where),
        examples=_examples(raw, where), vae=_relative_to(base, raw["vae"]) if raw.get("vae") else None, clip_skip=clip_skip,
        prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr, variant=raw.get("variant"),
        refiner=_relative_to(base, raw["refiner"]) if raw.get("refiner") else None, refiner_switch=float(switch),
    )


def load_registry(path: Path) -> Registry:
    """Read and validate a `models.toml`; errors name the file, the entry and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Model registry not found at {path}; create it or set DREAMLOOM_REGISTRY.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML: {error}.") from None
    entries = data.get("models", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: `models` must be a list of [[models]] tables.")
    models: dict[str, ModelSpec] = {}
    for index, raw in enumerate(entries):
        spec = _entry(raw, index, path.parent)
        if spec.name in models:
            raise ConfigError(f"{path}: model name {spec.name!r} is used twice.")
        models[spec.name] = spec
    default = data.get("default") or (next(iter(models)) if models else "")
    if models and default not in models:
        raise ConfigError(f"{path}: default model {default!r} is not one of the [[models]] entries.")
    lora_entries = data.get("loras", [])
    if not isinstance(lora_entries, list):
        raise ConfigError(f"{path}: `loras` must be a list of [[loras]] tables.")
    loras: dict[str, LoraSpec] = {}
    for index, raw in enumerate(lora_entries):
        lora = _lora_entry(raw, index, path.parent)
        if lora.name in loras or lora.name in models:
            raise ConfigError(f"{path}: the name {lora.name!r} is used twice.")
        loras[lora.name] = lora
    embedding_entries = data.get("embeddings", [])
    if not isinstance(embedding_entries, list):
        raise ConfigError(f"{path}: `embeddings` must be a list of [[embeddings]] tables.")
    embeddings: dict[str, EmbeddingSpec] = {}
    for index, raw in enumerate(embedding_entries):
        embedding = _embedding_entry(raw, index, path.parent)
        if embedding.name in embeddings or embedding.name in loras or embedding.name in models:
            raise ConfigError(f"{path}: the name {embedding.name!r} is used twice.")
        embeddings[embedding.name] = embedding
    # Every model loads the embeddings of its family: A1111 offers all of them, by name, to every prompt.
    models = {name: dataclasses.replace(spec, embeddings=tuple(e for e in embeddings.values() if e.family == spec.family))
              for name, spec in models.items()}
    unknown = set(data) - {"default", "models", "loras", "embeddings", "routing"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; known: default, models, loras, "
                          "embeddings, routing.")
    routing = data.get("routing", {})
    if isinstance(routing, dict) and "similarity_threshold" in routing:
        raise ConfigError(f"{path}: [routing] similarity_threshold is gone: routing now compares a prompt with each "
                          "entry's examples and with the default model's (no special style) and decides by margins; "
                          "use model_margin and lora_margin (see README), or remove the line for the calibrated defaults.")
    if not isinstance(routing, dict) or set(routing) - _ROUTING_FIELDS:
        raise ConfigError(f"{path}: [routing] takes {', '.join(sorted(_ROUTING_FIELDS))}.")
    for key in ("model_margin", "lora_margin"):
        value = routing.get(key, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1 <= value <= 1:
            raise ConfigError(f"{path}: [routing] {key} must be a number from -1 to 1 (a difference of cosine similarities).")
    for key, low, high in (("max_loras", 0, 10), ("top_k", 1, 20)):
        value = routing.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{path}: [routing] {key} must be a whole number from {low} to {high}.")
    return Registry(models=models, default=default, source=path, loras=loras, routing=dict(routing))


def register_model(registry_path: Path, *, name: str, path: Path, family: str, config: Path | None = None,
                   description: str = "", tags: tuple[str, ...] = ()) -> Registry:
    """Append a [[models]] entry to a models.toml (the owner's CLI: `dreamloom merge --register`); the file is
    checked with the entry before it is written, so a clash or a bad name changes nothing."""
    registry_path = Path(registry_path)
    registry = load_registry(registry_path)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{name!r} is not a model name: letters, digits, '.', '_' and '-' only.")
    if name in registry.models:
        raise ConfigError(f"A model called {name!r} is already registered; choose another name.")

    def place(target: Path) -> str:
        target = Path(target).resolve()
        try:
            return target.relative_to(registry_path.parent.resolve()).as_posix()
        except ValueError:
            return str(target)

    lines = ["", "[[models]]", f"name = {json.dumps(name)}", f"path = {json.dumps(place(path))}",
             f"family = {json.dumps(family)}"]
    if config is not None:
        lines.append(f"config = {json.dumps(place(config))}")
    if description:
        lines.append(f"description = {json.dumps(description)}")
    if tags:
        lines.append(f"tags = {json.dumps(list(tags))}")
    text = registry_path.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    candidate = registry_path.with_name(f".{registry_path.name}.new")
    candidate.write_text(text, encoding="utf-8")
    try:
        load_registry(candidate)
    except ConfigError:
        candidate.unlink(missing_ok=True)
        raise
    candidate.replace(registry_path)
    return load_registry(registry_path)
