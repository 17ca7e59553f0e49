"""The native request model and the legacy envelope adapter."""

from __future__ import annotations

import json
import re

import pytest

from diffusers_api.errors import InvalidInputs
from diffusers_api.schema import (
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    decode_envelope,
    from_legacy,
    parse_request,
    to_legacy,
)
from support.envelopes import GRASS


def test_legacy_envelope_maps_onto_the_native_request() -> None:
    request = from_legacy(GRASS)
    assert request.model == "builtin/tiny-sd"
    assert request.prompt == "realistic field of grass"
    assert (request.width, request.height, request.num_inference_steps) == (64, 64, 20)
    assert request.image_format == "PNG"


@pytest.mark.parametrize(
    ("call_key", "value", "field", "expected"),
    [
        ("PIPELINE", "img2img", "pipeline", "img2img"),
        ("SCHEDULER", "Euler a", "scheduler", "Euler a"),
        ("MODEL_PRECISION", "fp16", "precision", "fp16"),
        ("MODEL_REVISION", "main", "revision", "main"),
        ("safety_checker", False, "safety_checker", False),
        ("image_format", "jpg", "image_format", "JPEG"),
        ("image_quality", 80, "image_quality", 80),
        ("startRequestId", "abc", "request_id", "abc"),
        (
            "CHECKPOINT_CONFIG_URL",
            "https://x/v1-inference.yaml",
            "checkpoint_config_url",
            "https://x/v1-inference.yaml",
        ),
        ("image_format", "jxl", "image_format", "JXL"),
    ],
    ids=lambda v: str(v),
)
def test_call_inputs_map_to_fields(call_key: str, value: object, field: str, expected: object) -> None:
    request = from_legacy({"modelInputs": {}, "callInputs": {call_key: value}})
    assert getattr(request, field) == expected


def test_double_encoded_body_is_accepted() -> None:
    body = json.dumps(json.dumps(GRASS)).encode()
    assert decode_envelope(body) == GRASS


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"\\"just a string\\""', "JSON object"),
    ],
    ids=["garbage", "array", "string-of-string"],
)
def test_bad_bodies_are_invalid_inputs(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInputs, match=fragment):
        decode_envelope(body)


@pytest.mark.parametrize(
    ("envelope", "fragment"),
    [
        ({"callInputs": {}}, "missing required key\\(s\\): modelInputs"),
        ({"modelInputs": {}}, "missing required key\\(s\\): callInputs"),
        ({}, "modelInputs, callInputs"),
        ({"modelInputs": [], "callInputs": {}}, "modelInputs must be an object"),
        ({"modelInputs": {}, "callInputs": {"NOPE": 1}}, "callInputs.NOPE is not a known call input"),
        ({"modelInputs": {}, "callInputs": {"lora_weights": "x"}}, "lora_weights.0.url: Value error, must be an http"),
        ({"modelInputs": {}, "callInputs": {"textual_inversions": ["x"]}}, "textual_inversions.0.url: Value error"),
        ({"modelInputs": {}, "callInputs": {"train": True}}, "callInputs.train True makes a training"),
        ({"modelInputs": {}, "callInputs": {"SEND_URL": "ftp://x"}}, "send_url: Value error, must be an http"),
        ({"modelInputs": {"callback_steps": 0}, "callInputs": {}}, "callback_steps"),
        ({"modelInputs": {"image": "aGVsbG8="}, "callInputs": {"is_url": True}}, "must be an http\\(s\\) URL"),
        ({"modelInputs": {"width": 65}, "callInputs": {}}, "width: Input should be a multiple of 8"),
        ({"modelInputs": {"num_inference_steps": 0}, "callInputs": {}}, "num_inference_steps"),
        ({"modelInputs": {"seed": -1}, "callInputs": {}}, "seed"),
        ({"modelInputs": {"image": "a", "init_image": "b"}, "callInputs": {}}, "not both"),
        ({"modelInputs": {"generator": 1}, "callInputs": {}}, "set by the server"),
        ({"modelInputs": {"cross_attention_kwargs": "{bad"}, "callInputs": {}}, "not valid JSON"),
        ({"modelInputs": {}, "callInputs": {"image_format": "GIF"}}, "image_format"),
        ({"modelInputs": {"image": "aGk="}, "callInputs": {"FILL_MODE": "blur"}}, "fill_mode: Input should be 'none'"),
        (
            {"modelInputs": {}, "callInputs": {"FILL_MODE": "patchmatch"}},
            "fill_mode: pre-fills .* this request has none",
        ),
        (
            {"modelInputs": {}, "callInputs": {"attn_procs": "lora.safetensors"}},
            "attn_procs must be the http\\(s\\) URL",
        ),
        (
            {"modelInputs": {}, "callInputs": {"attn_procs": 0}},
            "attn_procs must be the http\\(s\\) URL",
        ),
    ],
    ids=[
        "no-modelInputs",
        "no-callInputs",
        "neither",
        "modelInputs-list",
        "unknown-call-input",
        "lora-not-a-url",
        "textual-inversion-not-a-url",
        "train-is-no-generation",
        "send-url-not-http",
        "zero-callback-steps",
        "is-url",
        "width-not-multiple-of-8",
        "zero-steps",
        "negative-seed",
        "image-and-init-image",
        "reserved-arg",
        "bad-cross-attention-json",
        "unknown-format",
        "unknown-fill-mode",
        "fill-mode-without-image",
        "attn-procs-not-a-url",
        "attn-procs-zero",
    ],
)
def test_bad_envelopes_name_the_problem(envelope: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputs, match=fragment) as caught:
        from_legacy(envelope)
    assert caught.value.status == 422
    assert caught.value.code == "INVALID_INPUTS"


def test_legacy_fill_mode_is_the_originals_call_input() -> None:
    request = from_legacy({"modelInputs": {"init_image": "aGk="}, "callInputs": {"FILL_MODE": "PatchMatch"}})
    assert (request.fill_mode, request.image) == ("patchmatch", "aGk=")


@pytest.mark.parametrize(
    ("call_inputs", "urls"),
    [
        ({"attn_procs": "https://x/a.safetensors"}, ["https://x/a.safetensors"]),
        (
            {"attn_procs": "https://x/a.safetensors", "lora_weights": "https://x/b"},
            ["https://x/b", "https://x/a.safetensors"],
        ),
        ({"attn_procs": None, "lora_weights": ["https://x/b"]}, ["https://x/b"]),
        ({"attn_procs": ""}, None),
    ],
    ids=["alone", "after-lora-weights", "null", "empty"],
)
def test_legacy_attn_procs_is_one_more_lora(call_inputs: dict, urls: list[str] | None) -> None:
    request = from_legacy({"modelInputs": {}, "callInputs": call_inputs})
    assert (urls is None and request.lora_weights is None) or [w.url for w in request.lora_weights or []] == urls


def test_legacy_aliases_and_passthrough() -> None:
    request = from_legacy(
        {
            "modelInputs": {"init_image": "abc", "callback_steps": 5, "guidance_rescale": 0.3},
            "callInputs": {"xformers_memory_efficient_attention": True, "MODEL_URL": ""},
        }
    )
    assert request.image == "abc"
    assert request.extra == {"guidance_rescale": 0.3}
    assert request.model_url == ""
    assert request.callback_steps == 5


def test_legacy_event_inputs_map_onto_the_request_and_the_key_stays_secret() -> None:
    request = from_legacy(
        {
            "modelInputs": {"prompt": "p"},
            "callInputs": {"SEND_URL": "http://hook", "SIGN_KEY": "s3cret", "streamEvents": True},
        }
    )
    assert request.send_url == "http://hook"
    assert request.stream_events is True
    assert request.sign_key is not None
    assert request.sign_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(request)
    assert "s3cret" not in request.model_dump_json()


def test_cross_attention_kwargs_accepts_a_json_string() -> None:
    request = from_legacy({"modelInputs": {"cross_attention_kwargs": '{"other": 0.5}'}, "callInputs": {}})
    assert request.cross_attention_kwargs == {"other": 0.5}


def test_native_request_reports_all_errors_at_once() -> None:
    with pytest.raises(InvalidInputs) as caught:
        parse_request({"width": 7, "height": 9, "bogus": 1})
    message = caught.value.message
    assert "width" in message
    assert "height" in message
    assert "bogus" in message


def test_image_count_multiplies_prompts_and_images_per_prompt() -> None:
    assert GenerateRequest(prompt=["a", "b"], num_images_per_prompt=3).image_count == 6
    assert GenerateRequest(prompt="a").image_count == 1


def _result(count: int) -> GenerateResult:
    return GenerateResult(
        images=[b"img%d" % i for i in range(count)],
        image_format="PNG",
        seeds=list(range(7, 7 + count)),
        nsfw=[False] * count,
        meta={"MODEL_ID": "m"},
        timings={"inference": 1.0},
    )


def test_legacy_response_has_one_or_many_images() -> None:
    single = to_legacy(_result(1))
    assert set(single) == {"image_base64", "nsfw_content_detected", "$meta", "$timings", "$mem_usage"}
    double = to_legacy(_result(2))
    assert len(double["images_base64"]) == 2
    assert "image_base64" not in double


def test_native_response_carries_seed_per_image() -> None:
    response = GenerateResponse.from_result(_result(2))
    assert [image.seed for image in response.images] == [7, 8]
    assert response.images[0].format == "png"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"lora_weights": "https://x/a.safetensors"}, [("https://x/a.safetensors", 1.0)]),
        (
            {"lora_weights": ["https://x/a", {"url": "https://x/b", "scale": 0.3}]},
            [("https://x/a", 1.0), ("https://x/b", 0.3)],
        ),
        (
            {
                "lora_weights": ["https://x/a", {"url": "https://x/b", "scale": 0.3}],
                "cross_attention_kwargs": {"scale": 0.6},
            },
            [("https://x/a", 0.6), ("https://x/b", 0.3)],
        ),
        ({"lora_weights": "https://x/a#fname=a.safetensors&scale=0.4"}, [("https://x/a", 0.4)]),
        (
            {"lora_weights": "https://x/a#fname=a.safetensors&scale=0.4", "cross_attention_kwargs": {"scale": 0.9}},
            [("https://x/a", 0.9)],
        ),
    ],
    ids=[
        "one-url",
        "list",
        "cross-attention-scale-is-the-default",
        "original-fragment-scale",
        "cross-attention-scale-wins-over-the-fragment",
    ],
)
def test_lora_weights_forms(given: dict, expected: list) -> None:
    request = GenerateRequest(**given)
    assert [(lora.url, lora.scale) for lora in request.lora_weights or []] == expected
    assert request.cross_attention_kwargs is None  # the scale went into the LoRAs: nothing left for the call


def test_cross_attention_kwargs_other_than_scale_stay() -> None:
    request = GenerateRequest(lora_weights="https://x/a", cross_attention_kwargs={"scale": 0.5, "other": 1})
    assert request.cross_attention_kwargs == {"other": 1}


def test_too_many_or_out_of_range_loras_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 8"):
        GenerateRequest(lora_weights=[f"https://x/{i}" for i in range(9)])
    with pytest.raises(ValueError, match="less than or equal to 8"):
        GenerateRequest(lora_weights=[{"url": "https://x/a", "scale": 9}])
    with pytest.raises(ValueError, match="must be between -8 and 8"):
        GenerateRequest(lora_weights="https://x/a", cross_attention_kwargs={"scale": 20})
    with pytest.raises(ValueError, match="is not a number"):
        GenerateRequest(lora_weights="https://x/a#scale=big")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://x/e.safetensors", ("https://x/e.safetensors", None)),
        ("https://x/9208#fname=easynegative.safetensors", ("https://x/9208", "easynegative")),
        ("https://x/9208#fname=easynegative.safetensors&token=bad-hands", ("https://x/9208", "bad-hands")),
        ({"url": "https://x/e#token=ignored", "token": "<cat>"}, ("https://x/e", "<cat>")),
    ],
    ids=["plain", "original-fname", "original-token", "object"],
)
def test_textual_inversion_forms(given: object, expected: tuple) -> None:
    request = GenerateRequest(textual_inversions=given)
    assert [(item.url, item.token) for item in request.textual_inversions or []] == [expected]


def test_a_lora_scale_without_loras_is_refused() -> None:
    with pytest.raises(ValueError, match=r"cross_attention_kwargs\.scale weighs LoRA weights, and this request names"):
        GenerateRequest(cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(InvalidInputs, match="cross_attention_kwargs"):
        from_legacy({"modelInputs": {"cross_attention_kwargs": '{"scale": 0.5}'}, "callInputs": {}})


@pytest.mark.parametrize("scale", [[0.5], {"a": 1}, "big", True], ids=["list", "object", "text", "bool"])
def test_a_cross_attention_scale_that_is_no_number_is_refused(scale: object) -> None:
    """A list or an object was a TypeError out of the validator: a 500."""
    with pytest.raises(InvalidInputs, match=r"cross_attention_kwargs\.scale must be a number, not "):
        parse_request({"lora_weights": "https://x/a", "cross_attention_kwargs": {"scale": scale}})


def test_a_textual_inversion_token_from_the_url_is_bounded_too() -> None:
    with pytest.raises(ValueError, match="longer than 100 characters"):
        GenerateRequest(textual_inversions=f"https://x/e#token={'t' * 101}")


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf"), "NaN"], ids=["nan", "inf", "-inf", "text"]
)
@pytest.mark.parametrize("field", ["guidance_scale", "strength", "eta"])
def test_a_number_that_is_not_finite_is_named_as_such(field: str, value: object) -> None:
    with pytest.raises(InvalidInputs) as caught:
        parse_request({field: value, "image": "aGk="})
    assert caught.value.message == f"{field}: Input should be a finite number"


def test_not_finite_numbers_in_a_raw_body_and_in_lora_scales() -> None:
    with pytest.raises(InvalidInputs, match="guidance_scale: Input should be a finite number"):
        parse_request(json.loads('{"guidance_scale": NaN}'))
    with pytest.raises(ValueError, match="finite number"):
        GenerateRequest(lora_weights=[{"url": "https://x/a", "scale": float("nan")}])


def test_strength_needs_an_image_and_the_schema_says_so() -> None:
    with pytest.raises(InvalidInputs) as caught:
        from_legacy({"modelInputs": {"prompt": "x", "strength": 0.5}, "callInputs": {}})
    message = "strength: applies to an input image (img2img, inpainting), and this request has none"
    assert caught.value.message == message
    assert GenerateRequest(strength=0.5, image="aGk=").strength == 0.5
    schema = GenerateRequest.model_json_schema()
    assert schema["dependentRequired"] == {"strength": ["image"], "mask_image": ["image"], "fill_mode": ["image"]}


@pytest.mark.parametrize("field", ["width", "height"])
def test_the_schema_says_what_sizes_are_accepted(field: str) -> None:
    prop = GenerateRequest.model_json_schema()["properties"][field]
    assert prop["anyOf"][0] | {"type": "integer"} == {"minimum": 8, "maximum": 8192, "multipleOf": 8, "type": "integer"}
    assert "multiple of 8" in prop["description"]
    assert "the model's minimum" in prop["description"]


IP = {"model": "builtin/tiny-ip-adapter", "image": "aGVsbG8="}


def test_ip_adapter_forms_and_defaults() -> None:
    one = GenerateRequest(prompt="x", ip_adapter=IP).ip_adapter
    assert one is not None
    assert (one.images, one.scale, one.subfolder, one.weight_name, one.image_encoder_folder) == (
        ["aGVsbG8="], 1.0, "", None, "image_encoder"
    )  # fmt: skip
    several = GenerateRequest(prompt="x", ip_adapter=IP | {"image": ["a", "b"], "scale": 0}).ip_adapter
    assert several is not None
    assert (several.images, several.scale) == (["a", "b"], 0.0)
    legacy = from_legacy({"modelInputs": {"prompt": "x", "ip_adapter": IP}, "callInputs": {}})
    assert legacy.ip_adapter == one
    assert legacy.extra == {}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"scale": 2.5}, "ip_adapter.scale: Input should be less than or equal to 2"),
        ({"scale": -1}, "ip_adapter.scale: Input should be greater than or equal to 0"),
        ({"image": ["a"] * 5}, "at most 4 items"),
        ({"image": []}, "at least 1 item"),
        ({"weight_name": "ip-adapter_sd15.bin"}, "ip_adapter.weight_name: String should match pattern"),
        ({"subfolder": "../secrets"}, "ip_adapter.subfolder: Value error, must be a folder inside"),
        ({"image_encoder_folder": "/etc"}, "ip_adapter.image_encoder_folder: Value error, must be a folder inside"),
        ({"model": ""}, "ip_adapter.model: String should have at least 1 character"),
        ({"images": ["a"]}, "ip_adapter.images: Extra inputs are not permitted"),
    ],
    ids=["scale-high", "scale-negative", "five-images", "no-image", "pickle", "subfolder-up", "encoder-absolute",
         "empty-model", "unknown-key"],
)  # fmt: skip
def test_bad_ip_adapters_are_refused_naming_the_field(change: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputs, match=re.escape(fragment)):
        parse_request({"prompt": "x", "ip_adapter": IP | change})


@pytest.mark.parametrize("name", ["ip_adapter_image", "negative_ip_adapter_image", "negative_ip_adapter_image_embeds"])
def test_ip_adapter_images_are_not_extra_arguments(name: str) -> None:
    """Flux's negative_ip_adapter_image reached the pipeline, a 500 (AttributeError) without an IP-Adapter loaded."""
    with pytest.raises(InvalidInputs, match=f"set by the server, not by a request: {name}"):
        parse_request({"prompt": "x", "extra": {name: "aGVsbG8="}})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"extra": {"guidance_rescale": float("nan")}}, "extra: guidance_rescale is nan; numbers must be finite"),
        ({"extra": {"sigmas": [1.0, float("inf")]}}, "extra: sigmas.1 is inf; numbers must be finite"),
        ({"cross_attention_kwargs": '{"a": -Infinity}'}, "cross_attention_kwargs: a is -inf; numbers must be finite"),
    ],
    ids=["nan", "inf-in-a-list", "json-string"],
)
def test_numbers_passed_through_must_be_finite(fields: dict, message: str) -> None:
    """As the request's own fields: a 1e999 guidance_rescale made a black image without an error."""
    with pytest.raises(InvalidInputs) as caught:
        parse_request({"prompt": "x", **fields})
    assert caught.value.message == message


@pytest.mark.parametrize("length", [0, -1, 513, 10**6, 1.5, "77", True])
def test_max_sequence_length_is_bounded(length: object) -> None:
    """PixArt checks none (10**6 asked for a terabyte), -1 was an OverflowError in SD3's and Flux's tokenizer: 500s."""
    with pytest.raises(InvalidInputs, match=r"max_sequence_length: .* is not a whole number from 1 to 512"):
        parse_request({"prompt": "x", "extra": {"max_sequence_length": length}})
    assert parse_request({"prompt": "x", "extra": {"max_sequence_length": 512}}).extra["max_sequence_length"] == 512


@pytest.mark.parametrize("given", ["scale", [1], 2], ids=["string", "list", "number"])
@pytest.mark.parametrize("name", ["joint_attention_kwargs", "attention_kwargs"])
def test_keyword_arguments_in_extra_must_be_an_object(name: str, given: object) -> None:
    """diffusers calls .get() on them: SD3 and Flux answered a string there with an AttributeError, a 500."""
    with pytest.raises(InvalidInputs, match=f"{name}: must be an object of keyword arguments"):
        parse_request({"prompt": "x", "extra": {name: given}})
    assert parse_request({"prompt": "x", "extra": {name: {"scale": 1}}}).extra == {name: {"scale": 1}}


@pytest.mark.parametrize(
    "extra",
    [{"num_inference_steps": 10**9}, {"width": 8192, "height": 8192}, {"num_images_per_prompt": 64},
     {"cross_attention_kwargs": "x"}, {"prompt": "another"}],
    ids=["steps", "size", "images", "cross-attention", "prompt"],
)  # fmt: skip
def test_a_field_of_the_request_is_refused_in_extra_where_its_checks_would_not_apply(extra: dict) -> None:
    """Arguments of the call that are the request's own fields are checked there (bounds, MAX_IMAGES, the pixel
    limit); in `extra` they passed those checks."""
    with pytest.raises(InvalidInputs, match="fields of the request; give them as such, not in extra") as caught:
        parse_request({"prompt": "x", "extra": extra})
    assert ", ".join(sorted(extra)) in caught.value.message
