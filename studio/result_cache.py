"""The result cache's key: everything that determines a job's pictures, so an identical request can be answered
from the image store instead of the GPU.

The key covers the model's files (A1111's model hash of the checkpoint or folder, its VAE, refiner and textual
inversions) and the settings that change how they load, each LoRA's file hash and weight, every parsed parameter
(prompt, negative prompt, size, steps, cfg, sampler, ...), the seed, and for upscales and variations the source
picture's content hash. Names are not enough: a LoRA retrained under the same name must miss.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dreamloom.errors import DreamloomError
from engine.hashes import FileHashes
from engine.registry import Registry

# Bump when the engine's output for the same inputs changes (a new sampler implementation, say): old results miss.
RESULT_CACHE_VERSION = 1
CACHED_KINDS = {"imagine": "imagine", "reroll": "imagine", "upscale": "upscale", "vary": "vary"}
# Parameters that record how a job came about, not what it draws.
_NOT_DETERMINING = {"chosen", "model_from_path"}


def result_key(*, kind: str, model: str | None, loras: list[dict[str, Any]], parameters: dict[str, Any],
               seed: int | None, prompt: str, negative_prompt: str, source_sha256: str | None, registry: Registry,
               hashes: FileHashes) -> str | None:
    """A hex digest of what determines the pictures, or None when the job cannot be cached (a learning job, no
    seed yet, a file that is missing: the worker will say what is wrong)."""
    if kind not in CACHED_KINDS or seed is None:
        return None
    try:
        spec = registry.models.get(model or "") or (registry.get(registry.default) if not model else None)
        if spec is not None:
            model_part = {
                "hash": hashes.model_hash(spec.path),
                "vae": hashes.model_hash(spec.vae) if spec.vae else None,
                "refiner": hashes.model_hash(spec.refiner) if spec.refiner else None,
                "embeddings": sorted((e.name, hashes.sha256(e.path)) for e in spec.embeddings),
                "load": [spec.family, spec.clip_skip, spec.prediction_type, spec.zero_terminal_snr, spec.variant,
                         spec.refiner_switch, json.dumps(spec.defaults, sort_keys=True, default=str)],
            }
        elif parameters.get("model_from_path"):  # the owner's CLI named a file or folder
            model_part = {"hash": hashes.model_hash(Path(model))}
        else:
            return None  # no longer registered: the worker reports it
        lora_part = [(entry["name"], hashes.lora_hash(registry.lora(entry["name"]).path), entry.get("weight"))
                     for entry in loras]
    except (OSError, KeyError, ValueError, DreamloomError):
        return None
    document = {
        "version": RESULT_CACHE_VERSION, "kind": CACHED_KINDS[kind], "model": model_part, "loras": lora_part,
        "parameters": {key: value for key, value in sorted(parameters.items()) if key not in _NOT_DETERMINING},
        "seed": seed, "prompt": prompt, "negative_prompt": negative_prompt, "source": source_sha256,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()
