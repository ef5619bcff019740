"""Which model a prompt runs on (torch-free, so front doors can check a prompt before queueing it)."""
from __future__ import annotations

from dreamloom.errors import UnknownModel
from engine.params import PromptRequest
from engine.registry import ModelSpec, Registry


def choose_model(registry: Registry, prompt: PromptRequest) -> ModelSpec:
    """The model a prompt asks for (`--model`, `--niji`) or the default; LoRAs are checked here."""
    if prompt.model:
        spec = registry.resolve(prompt.model)
    elif prompt.niji:
        niji = [spec for spec in registry.models.values() if "niji" in spec.tags]
        if not niji:
            raise UnknownModel("--niji needs a model tagged `niji` in models.toml; none is registered.")
        spec = niji[0]
    else:
        spec = registry.resolve(None)
    if prompt.loras:
        names = ", ".join(lora.name for lora in prompt.loras)
        raise UnknownModel(f"Unknown LoRA {names}: no LoRAs are registered in models.toml.")
    return spec
