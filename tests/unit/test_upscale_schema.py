"""The upscale request (`POST /v1/upscale`), its legacy spelling (`use_extra: "upsample"`), UPSCALER_URLS, and the
import of spandrel without torchvision."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from diffusers_api.config import DEFAULT_UPSCALER_URLS, Settings
from diffusers_api.errors import InvalidInputs
from diffusers_api.schema import UpscaleRequest, from_legacy, from_legacy_envelope, parse_upscale_request


def test_defaults_and_normalised_format() -> None:
    request = parse_upscale_request({"image": "abc", "image_format": "jpg"})
    assert request.model == "RealESRGAN_x4plus"
    assert request.scale is None
    assert request.face_enhance is False
    assert request.image_format == "JPEG"
    assert request.image_count == 1  # its share of the engine's batch


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "image: Field required"),
        ({"image": ""}, "image: String should have at least 1 character"),
        ({"image": "a", "scale": 0.5}, "scale: Input should be greater than or equal to 1"),
        ({"image": "a", "scale": 9}, "scale: Input should be less than or equal to 8"),
        ({"image": "a", "prompt": "x"}, "prompt: Extra inputs are not permitted"),
        ({"image": "a", "image_format": "GIF"}, "image_format: Input should be 'PNG', 'JPEG', 'WEBP' or 'JXL'"),
        ({"image": "a", "send_url": "ftp://x"}, "send_url: Value error, must be an http:// or https:// URL"),
    ],
    ids=["no-image", "empty-image", "scale-low", "scale-high", "unknown-field", "format", "send-url"],
)
def test_bad_requests_name_the_field(body: dict, words: str) -> None:
    with pytest.raises(InvalidInputs) as caught:
        parse_upscale_request(body)
    assert words in caught.value.message


def test_legacy_upsample_becomes_an_upscale_request() -> None:
    request = from_legacy_envelope(
        {
            "modelInputs": {"input_image": "abc", "face_enhance": False, "scale": 2},
            "callInputs": {"MODEL_ID": "realesr-general-x4v3", "use_extra": "upsample", "startRequestId": "r1"},
        }
    )
    assert isinstance(request, UpscaleRequest)
    assert (request.image, request.model, request.scale, request.request_id) == ("abc", "realesr-general-x4v3", 2, "r1")


def test_legacy_upsample_without_model_id_takes_the_default_upscaler() -> None:
    envelope = {"modelInputs": {"input_image": "abc"}, "callInputs": {"use_extra": "upsample"}}
    assert from_legacy_envelope(envelope).model == "RealESRGAN_x4plus"


@pytest.mark.parametrize(
    ("envelope", "words"),
    [
        ({"modelInputs": {}, "callInputs": {"use_extra": "upsample"}}, "needs modelInputs.input_image"),
        (
            {"modelInputs": {"input_image": "a", "prompt": "x"}, "callInputs": {"use_extra": "upsample"}},
            "does not read modelInputs.prompt",
        ),
        (
            {"modelInputs": {"input_image": "a"}, "callInputs": {"use_extra": "upsample", "PIPELINE": "x"}},
            "does not read callInputs.PIPELINE",
        ),
        ({"modelInputs": {"prompt": "x"}, "callInputs": {"use_extra": "train"}}, "allowed: upsample"),
    ],
    ids=["no-input-image", "generation-input", "generation-call-input", "unknown-extra"],
)
def test_bad_legacy_upsample_is_a_clear_error(envelope: dict, words: str) -> None:
    with pytest.raises(InvalidInputs) as caught:
        from_legacy_envelope(envelope)
    assert words in caught.value.message


def test_a_generation_may_give_an_empty_use_extra() -> None:
    request = from_legacy_envelope({"modelInputs": {"prompt": "x"}, "callInputs": {"use_extra": ""}})
    assert request.prompt == "x"
    with pytest.raises(InvalidInputs, match="answered by POST / and the RunPod worker only"):
        from_legacy({"modelInputs": {"input_image": "a"}, "callInputs": {"use_extra": "upsample"}})


def test_upscaler_urls_are_added_to_the_defaults() -> None:
    urls = Settings(upscaler_urls=" mine=/models/mine.pth , RealESRGAN_x4plus=https://mirror/x4.pth").upscaler_urls
    assert urls["mine"] == "/models/mine.pth"
    assert urls["RealESRGAN_x4plus"] == "https://mirror/x4.pth"
    assert urls["realesr-general-x4v3"] == DEFAULT_UPSCALER_URLS["realesr-general-x4v3"]
    with pytest.raises(ValueError, match="not a name=url pair: 'nameless'"):
        Settings(upscaler_urls="nameless")
    with pytest.raises(ValueError, match=re.escape("x=https://h/x.onnx: expected a .safetensors, .pth, .pt, .ckpt")):
        Settings(upscaler_urls="x=https://h/x.onnx")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_spandrel_imports_without_torchvision_and_leaves_no_stand_in() -> None:
    from diffusers_api.models.upscalers import import_spandrel

    spandrel = import_spandrel()
    assert "Compact" in {support.architecture.id for support in spandrel.MAIN_REGISTRY.architectures()}
    assert "torchvision" not in sys.modules
    assert importlib.util.find_spec("torchvision") is None  # transformers and diffusers still see none
