"""`controlnet` in the native request and CONTROLNET_MODEL_ID in the legacy envelope: what validation accepts,
what it refuses (and how it says so), and how the legacy keys map onto the native field."""

from __future__ import annotations

from typing import Any

import pytest

from diffusers_api.errors import InvalidInputs
from diffusers_api.schema import GenerateRequest, from_legacy, legacy_envelope_schema, parse_request

CONDITION = "aGVsbG8="  # any base64: images are decoded by the runner, not by validation


def control(**fields: Any) -> dict[str, Any]:
    return {"model": "builtin/tiny-controlnet", "image": CONDITION} | fields


def test_one_object_or_a_list_with_defaults() -> None:
    one = parse_request({"prompt": "x", "controlnet": control()})
    listed = parse_request({"prompt": "x", "controlnet": [control(), control(scale=0.5, start=0.1, end=0.9)]})
    assert one.controlnet is not None
    assert listed.controlnet is not None
    entry = one.controlnet[0]
    assert (entry.scale, entry.start, entry.end, entry.type, entry.source) == (1.0, 0.0, 1.0, "controlnet", entry.model)
    assert [c.scale for c in listed.controlnet] == [1.0, 0.5]
    by_url = parse_request({"prompt": "x", "controlnet": {"url": "s3:///bucket/cn.tar.zst", "image": CONDITION}})
    assert by_url.controlnet is not None
    assert by_url.controlnet[0].source == "s3:///bucket/cn.tar.zst"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([control()] * 5, "controlnet: List should have at most 4 items"),
        ([], "controlnet: List should have at least 1 item"),
        ({"image": CONDITION}, "give either `model` or `url`"),
        (control(url="https://example.com/cn.tar.zst"), "give either `model` or `url`"),
        (control(model=None, url="ftp://example.com/x"), "`url` must be an s3:// or http(s):// archive URL"),
        ({"model": "builtin/tiny-controlnet"}, "controlnet.0.image: Field required"),
        (control(start=0.6, end=0.4), "start (0.6) must be less than end (0.4)"),
        (control(start=0.5, end=0.5), "start (0.5) must be less than end (0.5)"),
        (control(end=1.5), "controlnet.0.end: Input should be less than or equal to 1"),
        (control(scale=-1), "controlnet.0.scale: Input should be greater than or equal to 0"),
        (control(type="lora"), "controlnet.0.type: Input should be 'controlnet' or 't2i'"),
        (control(type="t2i", start=0.2), "a T2I-Adapter acts from the first step"),
        (control(conditioning_scale=1), "controlnet.0.conditioning_scale: Extra inputs are not permitted"),
        ([control(), control(type="t2i")], "ControlNets or T2I-Adapters, not both"),
    ],
    ids=[
        "too-many", "empty", "no-model", "model-and-url", "bad-url", "no-image", "start-after-end", "start-is-end",
        "end-above-1", "negative-scale", "bad-type", "t2i-start", "unknown-key", "mixed-types",
    ],
)  # fmt: skip
def test_bad_entries_are_invalid_inputs_naming_the_problem(value: Any, message: str) -> None:
    with pytest.raises(InvalidInputs) as caught:
        parse_request({"prompt": "x", "controlnet": value})
    assert message in caught.value.message
    assert caught.value.status == 422


def test_json_schema_takes_one_object_or_a_list() -> None:
    schema = GenerateRequest.model_json_schema()["properties"]["controlnet"]
    listed, one, null = schema["anyOf"]
    assert listed["type"] == "array"
    assert listed["maxItems"] == 4
    assert one == listed["items"]
    assert null == {"type": "null"}


# --- legacy ---------------------------------------------------------------------------------------------------


def legacy(model_inputs: dict[str, Any], **call_inputs: Any) -> GenerateRequest:
    return from_legacy({"modelInputs": {"prompt": "x"} | model_inputs, "callInputs": call_inputs})


def test_legacy_controlnet_model_id_takes_the_image_as_its_condition() -> None:
    request = legacy(
        {"image": CONDITION, "controlnet_conditioning_scale": 0.7},
        CONTROLNET_MODEL_ID="lllyasviel/sd-controlnet-canny",
        PIPELINE="StableDiffusionControlNetPipeline",
    )
    assert request.image is None
    assert request.extra == {}
    assert request.pipeline == "StableDiffusionPipeline"
    assert request.controlnet is not None
    entry = request.controlnet[0]
    assert (entry.model, entry.image, entry.scale, entry.type) == (
        "lllyasviel/sd-controlnet-canny",
        CONDITION,
        0.7,
        "controlnet",
    )


def test_legacy_img2img_takes_the_condition_from_control_image() -> None:
    request = legacy(
        {"image": "aW5pdA==", "control_image": CONDITION, "strength": 0.5, "control_guidance_end": 0.5},
        CONTROLNET_MODEL_ID="builtin/tiny-controlnet",
        PIPELINE="StableDiffusionControlNetImg2ImgPipeline",
    )
    assert request.pipeline == "StableDiffusionImg2ImgPipeline"
    assert request.image == "aW5pdA=="
    assert request.controlnet is not None
    assert (request.controlnet[0].image, request.controlnet[0].end) == (CONDITION, 0.5)


@pytest.mark.parametrize(
    ("model_inputs", "call_inputs", "message"),
    [
        ({}, {"CONTROLNET_MODEL_ID": "x"}, "modelInputs.image (the conditioning image) is missing"),
        ({"image": CONDITION}, {"CONTROLNET_MODEL_ID": 3}, "callInputs.CONTROLNET_MODEL_ID must be a string"),
        (
            {"image": CONDITION, "mask_image": CONDITION},
            {"CONTROLNET_MODEL_ID": "x"},
            "with an init image: give the condition in control_image",
        ),
        (
            {"image": CONDITION, "controlnet": control()},
            {"CONTROLNET_MODEL_ID": "x"},
            "give modelInputs.controlnet or callInputs.CONTROLNET_MODEL_ID, not both",
        ),
    ],
    ids=["no-image", "not-a-string", "inpaint-without-control-image", "both-forms"],
)
def test_legacy_errors(model_inputs: dict[str, Any], call_inputs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputs) as caught:
        legacy(model_inputs, **call_inputs)
    assert message in caught.value.message


def test_legacy_schema_names_the_key() -> None:
    call_inputs = legacy_envelope_schema()["properties"]["callInputs"]["properties"]
    assert call_inputs["CONTROLNET_MODEL_ID"]["type"] == "string"
