"""Prompt weighting without a model: A1111's syntax read into weighted fragments, compel's syntax checked, the
model families that take weighted prompts, and the legacy call inputs that ask for them."""

from __future__ import annotations

import re
import time

import pytest

from diffusers_api.errors import InvalidInputs
from diffusers_api.prompts import (
    PromptSyntaxError,
    check_compel_syntax,
    check_request,
    parse,
    parse_a1111,
    split_breaks,
)
from diffusers_api.schema import GenerateRequest, from_legacy

UP = 1.1


def weights(text: str) -> list[tuple[str, float]]:
    return [(fragment, round(weight, 6)) for fragment, weight in parse_a1111(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red barn", [("a red barn", 1.0)]),
        ("", [("", 1.0)]),
        ("a (red) barn", [("a ", 1.0), ("red", 1.1), (" barn", 1.0)]),
        ("a ((red)) barn", [("a ", 1.0), ("red", 1.21), (" barn", 1.0)]),
        ("a [red] barn", [("a ", 1.0), ("red", round(1 / UP, 6)), (" barn", 1.0)]),
        ("a (red:1.3) barn", [("a ", 1.0), ("red", 1.3), (" barn", 1.0)]),
        ("a (red: 0.5 ) barn", [("a ", 1.0), ("red", 0.5), (" barn", 1.0)]),
        ("(red barn:-1)", [("red barn", -1.0)]),
        ("(a (red:2) barn)", [("a ", 1.1), ("red", 2.2), (" barn", 1.1)]),
        ("(a [red] barn)", [("a ", 1.1), ("red", 1.0), (" barn", 1.1)]),
        ("(red:1.2)(barn:1.2)", [("redbarn", 1.2)]),
        ("a \\(red\\) barn", [("a (red) barn", 1.0)]),
        ("(a \\(red\\):1.5)", [("a (red)", 1.5)]),
        ("\\[x\\] \\\\ y", [("[x] \\ y", 1.0)]),
        ("time: 5 o'clock", [("time: 5 o'clock", 1.0)]),
        ('(C++, well-known "quote":1.2)', [('C++, well-known "quote"', 1.2)]),
    ],
    ids=repr,
)
def test_a1111_fragments(text: str, expected: list[tuple[str, float]]) -> None:
    assert weights(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a (red barn", "'(' at character 3 is never closed"),
        ("a [red barn", "'[' at character 3 is never closed"),
        ("a red) barn", "')' at character 6 closes no '('"),
        ("a red:1.2) barn", "':1.2)' at character 6 closes no '('"),
        ("a red] barn", "']' at character 6 closes no '['"),
        ("(red:1.2.3)", "weight '1.2.3' at character 6 is not a number"),
    ],
)
def test_a1111_syntax_errors_say_what_and_where(text: str, message: str) -> None:
    with pytest.raises(PromptSyntaxError) as raised:
        parse_a1111(text)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a (red barn", "'(' at character 3 is never closed"),
        ("a red)1.3 barn", "')' at character 6 closes no '('"),
        ('("a cat", "a dog".blend(1, 1)', "'(' at character 1 is never closed"),
    ],
)
def test_compel_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(PromptSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_compel_syntax(text)


@pytest.mark.parametrize(
    "text", ["a (red)1.3 barn", "red++ barn--", '("a (cat", "a dog").blend(1, 1)', "a \\(red\\) barn", "plain"]
)
def test_compel_syntax_that_reads(text: str) -> None:
    check_compel_syntax(text)


def fragments(text: str, weighting: str | None) -> list[tuple[str, float]]:
    [conjunction] = parse(text, weighting)  # type: ignore[arg-type]
    return [(f.text, round(f.weight, 6)) for prompt in conjunction.prompts for f in prompt.children]


def test_each_syntax_reaches_compel_with_the_same_weights() -> None:
    assert fragments("a (red:1.3) barn", "a1111") == [("a ", 1.0), ("red", 1.3), (" barn", 1.0)]
    assert fragments("a (red)1.3 barn", "compel") == [("a", 1.0), ("red", 1.3), ("barn", 1.0)]
    assert fragments("a red++ barn", "compel") == [("a", 1.0), ("red", 1.21), ("barn", 1.0)]
    # No weighting (long prompts alone): the text as it is, brackets and pluses included
    assert fragments("a (red)1.3 barn++", None) == [("a (red)1.3 barn++", 1.0)]


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a red barn BREAK a blue sky", [[("a red barn", 1.0)], [("a blue sky", 1.0)]]),
        # a bracket may span a BREAK; its weight holds on both sides
        ("(a red barn BREAK a blue sky:1.3) x", [[("a red barn", 1.3)], [("a blue sky", 1.3), (" x", 1.0)]]),
        # each BREAK ends a chunk, even an empty one; the word in other cases or inside another is text
        ("BREAK a BREAK BREAK b", [[("", 1.0)], [("a", 1.0)], [("", 1.0)], [("b", 1.0)]]),
        ("break a BREAKFAST Break", [[("break a BREAKFAST Break", 1.0)]]),
    ],
)
def test_a1111_break_cuts_the_prompt_into_parts(text: str, parts: list[list[tuple[str, float]]]) -> None:
    assert [[(t, round(w, 6)) for t, w in part] for part in split_breaks(parse_a1111(text))] == parts
    assert len(parse(text, "a1111")) == len(parts)
    assert len(parse(text, "compel")) == len(parse(text, None)) == 1  # compel's syntax has no BREAK


def test_compel_conjunction_and_blend() -> None:
    assert len(parse('("a red barn", "an oil painting").and()', "compel")[0].prompts) == 2
    blend = parse('("a red barn", "a blue barn").blend(0.7, 0.3)', "compel")[0].prompts[0]
    assert blend.weights == [0.7, 0.3]


def test_swap_is_refused() -> None:
    with pytest.raises(PromptSyntaxError, match="swap"):
        parse('a "cat".swap("dog")', "compel")


# --- which models, and the request around the prompts ------------------------------------------------------------


def pipeline_class(name: str) -> type:
    import diffusers

    cls: type = getattr(diffusers, name)
    return cls


@pytest.mark.parametrize("name", ["StableDiffusionPipeline", "StableDiffusionXLImg2ImgPipeline"])
def test_sd_and_sdxl_take_weighted_prompts(name: str) -> None:
    check_request(GenerateRequest(prompt="a (red:1.2) barn", prompt_weighting="a1111"), pipeline_class(name), "m")


@pytest.mark.parametrize(
    ("name", "family"), [("StableDiffusion3Pipeline", "stable-diffusion-3"), ("FluxPipeline", "flux")]
)
@pytest.mark.parametrize("option", [{"prompt_weighting": "compel"}, {"long_prompts": True}])
def test_other_families_are_refused_naming_the_option_and_family(name: str, family: str, option: dict) -> None:
    request = GenerateRequest(prompt="a red barn", **option)
    with pytest.raises(InvalidInputs) as raised:
        check_request(request, pipeline_class(name), "builtin/tiny-x")
    field = next(iter(option))
    assert str(raised.value) == (
        f"{field}: supported for Stable Diffusion 1.x/2.x and SDXL models; builtin/tiny-x runs {name} ({family})"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "a (red barn", "prompt_weighting": "compel"}, "prompt: '(' at character 3 is never closed"),
        ({"prompt": "x", "negative_prompt": ["ok", "bad]"], "prompt_weighting": "a1111"}, "negative_prompt: ']'"),
        ({"prompt": "x", "extra": {"prompt_2": "(y"}, "prompt_weighting": "a1111"}, "prompt_2: '(' at character 1"),
        ({"long_prompts": True}, "prompt: required with long_prompts"),
    ],
)
def test_bad_prompts_are_refused_before_anything_runs(fields: dict, message: str) -> None:
    with pytest.raises(InvalidInputs, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_request(GenerateRequest(**fields), pipeline_class("StableDiffusionPipeline"), "m")


def test_native_lpw_pipeline_name_is_long_a1111_prompts() -> None:
    request = GenerateRequest(prompt="x", pipeline="lpw_stable_diffusion")
    assert (request.pipeline, request.long_prompts, request.prompt_weighting) == (None, True, "a1111")
    compel = GenerateRequest(prompt="x", pipeline="lpw_stable_diffusion", prompt_weighting="compel")
    assert compel.prompt_weighting == "compel"
    assert GenerateRequest(prompt="x").model_dump(include={"prompt_weighting", "long_prompts"}) == {
        "prompt_weighting": None,
        "long_prompts": False,
    }


# --- legacy call inputs -----------------------------------------------------------------------------------------


def legacy(**call_inputs: object) -> GenerateRequest:
    return from_legacy({"modelInputs": {"prompt": "a (red)1.2 barn"}, "callInputs": call_inputs})


def test_legacy_compel_prompts() -> None:
    assert legacy(compel_prompts=True).prompt_weighting == "compel"
    assert legacy(compel_prompts=False).prompt_weighting is None
    with pytest.raises(InvalidInputs, match="compel_prompts must be true or false"):
        legacy(compel_prompts="yes")


@pytest.mark.parametrize(("method", "pipeline"), [("text2img", "txt2img"), ("img2img", "img2img"), (None, None)])
def test_legacy_lpw_pipeline_and_its_method(method: str | None, pipeline: str | None) -> None:
    request = legacy(PIPELINE="lpw_stable_diffusion", custom_pipeline_method=method)
    assert (request.pipeline, request.long_prompts, request.prompt_weighting) == (pipeline, True, "a1111")
    both = legacy(PIPELINE="lpw_stable_diffusion", custom_pipeline_method=method, compel_prompts=True)
    assert both.prompt_weighting == "compel"


def test_legacy_custom_pipeline_method_errors() -> None:
    with pytest.raises(InvalidInputs, match="applies to PIPELINE lpw_stable_diffusion only"):
        legacy(PIPELINE="StableDiffusionPipeline", custom_pipeline_method="img2img")
    with pytest.raises(InvalidInputs, match="must be one of text2img, img2img, inpaint, not 'upscale'"):
        legacy(PIPELINE="lpw_stable_diffusion", custom_pipeline_method="upscale")


@pytest.mark.parametrize("method", [["text2img"], {"task": "img2img"}], ids=["list", "object"])
def test_legacy_custom_pipeline_method_of_another_type(method: object) -> None:
    """Not a name: looked up among the names it was an unhashable TypeError, a 500."""
    with pytest.raises(InvalidInputs, match="must be one of text2img, img2img, inpaint, not "):
        legacy(PIPELINE="lpw_stable_diffusion", custom_pipeline_method=method)


# --- bounds: what a prompt may weigh, and how deep its brackets nest --------------------------------------------


@pytest.mark.parametrize(
    ("text", "weighting", "message"),
    [
        ("a" + "+" * 1000, "compel", "the weight of 'a' is 2.47e+41; weights are from -100 to 100"),
        ("(a)1000000000000000000000000000000", "compel", "the weight of 'a' is 1e+30"),
        ('("a", "b").blend(1000, 1)', "compel", "the weight of a .blend() part is 1000"),
        ('("a", "b").and(1000, 1)', "compel", "the weight of an .and() part is 1000"),
        ("(a:99999999999)", "a1111", "the weight of 'a' is 1e+11"),
        ("(" * 17 + "a" + ")" * 17, "a1111", "brackets nested 17 deep at character 17; at most 16"),
        ("(" * 100 + "a" + ")" * 100, "compel", "brackets nested 17 deep at character 17; at most 16"),
    ],
    ids=["compel-plus", "compel-number", "blend", "and", "a1111-number", "a1111-nesting", "compel-nesting"],
)
def test_weights_past_the_bound_and_brackets_nested_too_deep_are_refused(
    text: str, weighting: str, message: str
) -> None:
    """Such weights overflowed the attention into NaN: a black image and no error. compel's parser recursed past
    Python's limit on brackets nested 100 deep (a RecursionError, a 500)."""
    with pytest.raises(PromptSyntaxError, match=re.escape(message)):
        parse(text, weighting)  # type: ignore[arg-type]


def test_compel_reads_nested_brackets_in_linear_time() -> None:
    """Its parser took 60 s at 8 levels and about 15 times longer per level further (hours at 12), holding the
    engine's thread; memoized (pyparsing's packrat mode), 16 levels take milliseconds."""
    started = time.perf_counter()
    for depth in (8, 12, 16):
        parse("(" * depth + "a" + ")" * depth, "compel")
    assert time.perf_counter() - started < 5
