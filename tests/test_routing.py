"""Prompt-based routing: a table of real prompts with the model and LoRAs a person would pick, and the errors."""
from __future__ import annotations

import pytest

from dreamloom.errors import ConfigError, InvalidPrompt, UnknownModel
from engine.params import parse_prompt
from engine.registry import load_registry
from engine.routing import route
from tests.conftest import ROOT, TEST_REGISTRY

S, N = "starter-shapes", "starter-niji"
# prompt -> (model, LoRAs in order). Explicit choices, trigger words, keywords, similarity, defaults.
TABLE = [
    ("a red circle on a blue background", S, []),
    ("a small green square at the top, gradient style", S, []),
    ("a blue triangle", S, []),
    ("a purple star on a white background", S, []),
    ("an orange circle on the left", S, []),
    ("a large yellow square on a black background", S, []),
    ("a white triangle at the bottom, flat style", S, []),
    ("a red star --model starter-niji", N, []),
    ("a red star --niji", N, []),
    ("a blue circle --niji 6", N, []),
    ("a green square <lora:outline:0.7>", S, ["outline"]),
    ("a green square --lora night:0.5", S, ["night"]),
    ("a yellow star <lora:outline> <lora:night:0.8>", S, ["outline", "night"]),
    ("lineart of a blue square", S, ["outline"]),
    ("nightfall over a red triangle", S, ["night"]),
    ("an anime red circle on a pink background", N, []),
    ("manga style yellow star", N, []),
    ("niji purple square", N, []),
    ("a kawaii green circle", N, []),
    ("pastel blue triangle on a white background", N, []),
    ("a comic book red star", S, ["outline"]),
    ("an inked black square on a yellow background", S, ["outline"]),
    ("a cartoon circle, outlined", S, ["outline"]),
    ("a red circle at night", S, ["night"]),
    ("a moonlit green triangle", S, ["night"]),
    ("a starry midnight over a white star", S, ["night"]),
    ("a yellow moon in the dark", S, ["night"]),
    ("a spooky evening sky over a yellow star", S, ["night"]),
    ("twilight over the sea, owls hunting", S, ["night"]),
    ("a sketch drawn with a pen", S, ["outline"]),
    ("a japanese animation character", N, []),
    ("an anime circle at night", N, ["night"]),
    ("a manga panel with ink outlines", N, ["outline"]),
    ("a comic star at midnight", S, ["outline", "night"]),
    ("lineart nightfall blue square", S, ["outline", "night"]),
    ("a blue square --model starter-shapes", S, []),
    ("an anime square --model starter-shapes", S, []),
    ("a red circle --no night", S, []),
    ("a gradient orange star on a purple background --ar 3:2", S, []),
    ("a black triangle on a green background --seed 7", S, []),
    ("a soft pale pink square", S, []),
    ("a photograph of a watercolor fox", S, []),
]


@pytest.fixture(scope="module")
def kit():
    return load_registry(TEST_REGISTRY)


def test_the_routing_table_is_at_least_90_percent_right(kit):
    assert len(TABLE) >= 40
    wrong = []
    for text, model, loras in TABLE:
        decision = route(kit, parse_prompt(text))
        got = (decision.model, [lora.name for lora in decision.loras])
        if got != (model, loras):
            wrong.append((text, got, (model, loras), decision.reasons))
    accuracy = 1 - len(wrong) / len(TABLE)
    print(f"\nrouting table: {len(TABLE) - len(wrong)}/{len(TABLE)} = {accuracy:.1%}")
    for text, got, expected, reasons in wrong:
        print(f"  {text!r}: got {got}, expected {expected}; {reasons}")
    assert accuracy >= 0.90, wrong


def test_a_decision_says_why_and_adds_trigger_words(kit):
    decision = route(kit, parse_prompt("a comic book red star"))
    assert decision.loras[0].name == "outline" and decision.loras[0].weight == 1.0
    assert decision.prompt.prompt.endswith(", lineart") and decision.prompt.parts[0].text.endswith(", lineart")
    assert any("keyword \u201ccomic\u201d" in reason for reason in decision.reasons)
    with pytest.raises(InvalidPrompt, match="weight from -2 to 2"):
        parse_prompt("a star <lora:night:5>")
    assert route(kit, parse_prompt("a star <lora:night:-1.5>")).loras[0].weight == -1.5
    assert route(kit, parse_prompt("lineart circle")).prompt.prompt == "lineart circle"  # already there
    assert decision.to_dict()["reasons"] == list(decision.reasons)


def test_conflicting_loras_keep_one_per_group(tmp_path):
    registry = tmp_path / "models.toml"
    registry.write_text(TEST_REGISTRY.read_text().replace('path = "../models/', f'path = "{ROOT}/models/') + """
[[loras]]
name = "sunset"
path = "sunset.safetensors"
family = "starter"
keywords = ["sunset"]
group = "palette"
""")
    decision = route(load_registry(registry), parse_prompt("a red circle at night, sunset"))
    assert [lora.name for lora in decision.loras] == ["night"]
    assert any("sunset skipped" in reason for reason in decision.reasons)


def test_incompatible_and_unknown_names_say_what_is_wrong(tmp_path):
    registry = tmp_path / "models.toml"
    registry.write_text(TEST_REGISTRY.read_text().replace('path = "../models/', f'path = "{ROOT}/models/') + """
[[loras]]
name = "xl-detail"
path = "xl-detail.safetensors"
family = "sdxl"
keywords = ["detailed"]
""")
    kit = load_registry(registry)
    with pytest.raises(InvalidPrompt, match="xl-detail is for sdxl models and cannot be applied to starter-shapes"):
        route(kit, parse_prompt("a red circle <lora:xl-detail>"))
    skipped = route(kit, parse_prompt("a detailed red circle"))
    assert skipped.loras == () and any("xl-detail skipped: it is for sdxl" in r for r in skipped.reasons)
    with pytest.raises(UnknownModel, match="Unknown LoRA 'nope'. Registered LoRAs: night, outline, xl-detail"):
        route(kit, parse_prompt("a cat <lora:nope>"))
    with pytest.raises(UnknownModel, match="Unknown model 'nope'"):
        route(kit, parse_prompt("a cat --model nope"))


@pytest.mark.parametrize("entry, message", [
    ('[[loras]]\nname = "x"\nfamily = "starter"\n', "[[loras]] entry 1 needs a non-empty text field 'path'"),
    ('[[loras]]\nname = "x"\npath = "x.safetensors"\nfamily = "sd3"\n', "LoRA 'x': family must be one of"),
    ('[[loras]]\nname = "x"\npath = "x.safetensors"\nfamily = "starter"\nweight = 9\n', "LoRA 'x': weight must be a number from -2 to 2"),
    ('[[loras]]\nname = "x"\npath = "x.safetensors"\nfamily = "starter"\ntriggers = "x"\n', "LoRA 'x': triggers must be a list"),
    ('[[loras]]\nname = "x"\npath = "x.safetensors"\nfamily = "starter"\ncolour = 1\n', "unknown field(s) colour"),
    ('[[loras]]\nname = "starter-shapes"\npath = "x.safetensors"\nfamily = "starter"\n', "'starter-shapes' is used twice"),
])
def test_bad_registry_entries_name_the_entry_and_field(tmp_path, entry, message):
    registry = tmp_path / "models.toml"
    registry.write_text('default = "starter-shapes"\n[[models]]\nname = "starter-shapes"\npath = "m"\nfamily = "starter"\n' + entry)
    with pytest.raises(ConfigError) as error:
        load_registry(registry)
    assert message in str(error.value)
    with pytest.raises(ConfigError, match="Model registry not found at"):
        load_registry(tmp_path / "missing.toml")
