"""The prompt syntax: a table of real prompts, every error, and properties that hold for any input."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamloom.errors import InvalidPrompt
from engine.families import FAMILIES, image_size
from engine.params import MAX_SEED, QUALITIES, SAMPLERS, LoraChoice, WeightedPrompt, parse_prompt

REAL_PROMPTS = [
    ("a castle at dusk --ar 16:9", {"prompt": "a castle at dusk", "aspect_ratio": (16, 9)}),
    ("portrait of an old sailor, oil painting --ar 2:3 --seed 1234 --stylize 250",
     {"prompt": "portrait of an old sailor, oil painting", "aspect_ratio": (2, 3), "seed": 1234, "stylize": 250}),
    ("cyberpunk street at night, neon, rain --c 30 --s 750 --no people, cars",
     {"chaos": 30, "stylize": 750, "negative_prompt": "people, cars"}),
    ("isometric cozy room --q .5 --n 1", {"quality": 0.5, "n": 1}),
    ("a red circle on a blue background --ar 3:2 --seed 7", {"prompt": "a red circle on a blue background", "seed": 7}),
    ("space ship::2 planet::0.5", {"parts": (WeightedPrompt("space ship", 2.0), WeightedPrompt("planet", 0.5))}),
    ("hot dog:: --seed 3", {"parts": (WeightedPrompt("hot dog", 1.0),), "seed": 3}),
    ("still life:: fruit::-0.5 bowl", {"parts": (WeightedPrompt("still life", 1.0), WeightedPrompt("fruit", -0.5),
                                                  WeightedPrompt("bowl", 1.0))}),
    ("anime girl with umbrella --niji 6 --ar 9:16", {"niji": True, "aspect_ratio": (9, 16)}),
    ("anime girl --niji", {"niji": True}),
    ("seamless moss texture --tile --ar 1:1", {"tile": True}),
    ("a fox <lora:watercolor:0.8> in the snow", {"prompt": "a fox in the snow", "loras": (LoraChoice("watercolor", 0.8),)}),
    ("a fox --lora outline:0.5 --lora night", {"loras": (LoraChoice("outline", 0.5), LoraChoice("night", None))}),
    ("macro shot of a bee --cfg 9.5 --steps 40 --sampler euler_a",
     {"cfg": 9.5, "steps": 40, "sampler": "euler_a"}),
    ("a lighthouse in a storm \u2014ar 16:9 \u2014chaos 30", {"aspect_ratio": (16, 9), "chaos": 30}),
    ("a lighthouse --model sdxl-base", {"model": "sdxl-base"}),
    ("a lighthouse --m my model v2", {"model": "my model v2"}),
    ("dreamy landscape --iw 1.5", {"image_weight": 1.5}),
    ("a cat--dog hybrid --seed 0", {"prompt": "a cat--dog hybrid", "seed": 0}),
    ("a tall tower --ar 1:4", {"aspect_ratio": (1, 4)}),
    ("a wide beach --aspect 4:1 --seed 4294967295", {"aspect_ratio": (4, 1), "seed": MAX_SEED}),
    ("  lots   of\nspaces  ", {"prompt": "lots of spaces"}),
    ("a sunset --no", None),  # --no needs a value
]


@pytest.mark.parametrize("text,expected", REAL_PROMPTS)
def test_real_prompts(text, expected):
    if expected is None:
        with pytest.raises(InvalidPrompt):
            parse_prompt(text)
        return
    request = parse_prompt(text)
    for field, value in expected.items():
        assert getattr(request, field) == value, field
    assert request.raw == text


BAD_PROMPTS = [
    ("x --chaos 101", "chaos", "0 to 100"),
    ("x --c -1", "chaos", "0 to 100"),
    ("x --stylize 1001", "stylize", "0 to 1000"),
    ("x --seed 4294967296", "seed", "0 to 4294967295"),
    ("x --seed abc", "seed", "whole number"),
    ("x --ar 5:1", "ar", "1:4 to 4:1"),
    ("x --ar 16x9", "ar", "W:H"),
    ("x --ar 0:1", "ar", "1:4 to 4:1"),
    ("x --cfg 0.5", "cfg", "1 to 30"),
    ("x --cfg nan", "cfg", "1 to 30"),
    ("x --steps 151", "steps", "1 to 150"),
    ("x --q 3", "q", ".25, .5, 1, 2"),
    ("x --q 0.3", "q", ".25, .5, 1, 2"),
    ("x --n 5", "n", "1 to 4"),
    ("x --sampler k_lms", "sampler", "euler"),
    ("x --iw 4", "iw", "0 to 3"),
    ("x --lora name:3", "lora", "-2 to 2"),
    ("x <lora:name:abc>", "lora", "-2 to 2"),
    ("x --tile yes", "tile", "flag"),
    ("x --foo 3", "foo", "Unknown parameter --foo"),
    ("x --seed 1 --seed 2", "seed", "more than once"),
    ("x --ar 16:9 in the style of", "ar", "one value"),
    ("x --model", "model", "needs a value"),
]


@pytest.mark.parametrize("text,parameter,fragment", BAD_PROMPTS)
def test_errors_name_the_parameter_and_range(text, parameter, fragment):
    with pytest.raises(InvalidPrompt) as caught:
        parse_prompt(text)
    assert caught.value.parameter == parameter
    assert fragment in str(caught.value)
    assert f"--{parameter}" in str(caught.value) or parameter == "lora"


def test_empty_prompt_is_refused_unless_an_image_is_attached():
    with pytest.raises(InvalidPrompt, match="empty"):
        parse_prompt("   --ar 16:9")
    assert parse_prompt("--iw 2", allow_empty=True).parts == ()


def test_multi_prompt_weights_must_sum_positive():
    with pytest.raises(InvalidPrompt, match="more than 0"):
        parse_prompt("cake::-1 chocolate::0.5")


def test_overlong_prompt_and_nul_are_refused():
    with pytest.raises(InvalidPrompt, match="limit"):
        parse_prompt("a" * 5000)
    with pytest.raises(InvalidPrompt, match="NUL"):
        parse_prompt("a\x00b")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sizes_follow_the_family(family):
    spec = FAMILIES[family]
    for ratio in ((1, 1), (16, 9), (9, 16), (4, 1), (1, 4), (3, 2)):
        width, height = image_size(spec, ratio)
        assert width % spec.multiple == 0 and height % spec.multiple == 0
        assert 0.5 < width * height / spec.native_side**2 < 1.6
        if ratio[0] > ratio[1]:
            assert width > height
    assert image_size(FAMILIES["starter"], (1, 1)) == (64, 64)
    assert image_size(FAMILIES["sd15"], (1, 1)) == (512, 512)


# -- properties -------------------------------------------------------------------------------

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,'", min_size=1, max_size=40).filter(lambda s: s.strip(" ,'"))


@st.composite
def valid_prompts(draw):
    text = draw(words)
    params: dict = {}
    parts = [text]
    if draw(st.booleans()):
        w, h = draw(st.integers(1, 20)), draw(st.integers(1, 20))
        if 0.25 <= w / h <= 4:
            parts.append(f"--ar {w}:{h}")
            params["aspect_ratio"] = (w, h)
    for name, field, strategy in (("seed", "seed", st.integers(0, MAX_SEED)), ("chaos", "chaos", st.integers(0, 100)),
                                  ("s", "stylize", st.integers(0, 1000)), ("steps", "steps", st.integers(1, 150)),
                                  ("n", "n", st.integers(1, 4))):
        if draw(st.booleans()):
            value = draw(strategy)
            parts.append(f"--{name} {value}")
            params[field] = value
    if draw(st.booleans()):
        value = draw(st.sampled_from(QUALITIES))
        parts.append(f"--q {value:g}")
        params["quality"] = value
    if draw(st.booleans()):
        value = draw(st.sampled_from(SAMPLERS))
        parts.append(f"--sampler {value}")
        params["sampler"] = value
    if draw(st.booleans()):
        parts.append("--tile")
        params["tile"] = True
    order = draw(st.permutations(parts[1:]))
    return " ".join([parts[0], *order]), params


@settings(max_examples=300, deadline=None)
@given(valid_prompts())
def test_any_valid_prompt_parses_to_what_it_says(case):
    text, params = case
    request = parse_prompt(text)
    for field, value in params.items():
        assert getattr(request, field) == value
    assert "--" not in request.prompt


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_a_request_or_an_invalid_prompt(text):
    try:
        request = parse_prompt(text)
    except InvalidPrompt as error:
        assert str(error)
        return
    assert request.prompt == request.prompt.strip()
    assert 1 <= request.n <= 4


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([("chaos", 0, 100), ("stylize", 0, 1000), ("steps", 1, 150), ("n", 1, 4), ("seed", 0, MAX_SEED)]),
       st.integers(-10**12, 10**12))
def test_out_of_range_numbers_are_refused_with_the_range(spec, value):
    name, low, high = spec
    text = f"a prompt --{name} {value}"
    if low <= value <= high:
        assert getattr(parse_prompt(text), "stylize" if name == "stylize" else name) == value
    else:
        with pytest.raises(InvalidPrompt) as caught:
            parse_prompt(text)
        assert caught.value.parameter == name and f"{low} to {high}" in str(caught.value)
