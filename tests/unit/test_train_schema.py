"""The training request (schema/train.py) and its legacy envelope: what is taken, ignored and refused."""

from __future__ import annotations

from typing import Any

import pytest

from diffusers_api.errors import InvalidInputs
from diffusers_api.schema import GenerateRequest, from_legacy, is_training, train_from_legacy
from diffusers_api.schema.train import IGNORED_ARGS, TrainRequest, parse_train_request

BASE = {"instance_images": ["aGVsbG8="], "instance_prompt": "a photo of sks dog", "name": "sks"}


def train(**fields: Any) -> TrainRequest:
    return parse_train_request(BASE | fields)


def refused(data: Any) -> InvalidInputs:
    with pytest.raises(InvalidInputs) as caught:
        parse_train_request(data)
    return caught.value


def test_defaults_train_a_lora_with_the_lora_rate() -> None:
    request = train()
    assert (request.train_mode, request.rank, request.max_train_steps) == ("lora", 4, 400)
    assert request.effective_learning_rate == 1e-4
    assert train(train_mode="full").effective_learning_rate == 5e-6
    scaled = train(learning_rate=1e-3, scale_lr=True, train_batch_size=2, gradient_accumulation_steps=3)
    assert scaled.effective_learning_rate == pytest.approx(6e-3)
    assert request.trained_id == "trained/sks"


def test_an_unknown_argument_is_refused_with_the_list_of_known_ones() -> None:
    error = refused(BASE | {"max_steps": 10})
    assert error.status == 422
    assert "unknown training arguments: max_steps" in error.message
    assert {"max_train_steps", "learning_rate", "instance_prompt", "use_8bit_adam"} <= set(error.extra["known"])


def test_the_originals_machinery_arguments_are_accepted_and_ignored() -> None:
    request = train(**dict.fromkeys(IGNORED_ARGS, True))
    assert not set(request.model_dump()) & IGNORED_ARGS


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"with_prior_preservation": True}, "class_prompt: required with with_prior_preservation"),
        ({"with_prior_preservation": True, "class_prompt": "a", "num_class_images": 1001}, "num_class_images"),
        ({"push_to_hub": True}, "hub"),
        ({"dest_url": "https://example.com/x"}, "dest_url: Value error, must be an s3://"),
        ({"name": "../etc"}, "name: String should match pattern"),
        ({"resolution": 33}, "resolution: Input should be a multiple of 8"),
        ({"max_train_steps": 0}, "max_train_steps"),
        ({"train": "textual_inversion"}, "train: Input should be 'dreambooth'"),
        ({"instance_images": []}, "instance_images"),
    ],
    ids=[
        "prior-without-class",
        "too-many-class-images",
        "hub",
        "http-dest",
        "bad-name",
        "resolution",
        "steps",
        "method",
        "no-images",
    ],
)
def test_what_cannot_be_done_is_refused_clearly(fields: dict[str, Any], fragment: str) -> None:
    assert fragment in refused(BASE | fields).message


def test_prior_preservation_counts_its_class_images() -> None:
    assert train().class_image_count == 0
    assert train(class_prompt="a dog", class_images=["aGVsbG8="]).class_image_count == 0  # not asked: unused
    prior = {"with_prior_preservation": True, "class_prompt": "a dog"}
    assert train(**prior).class_image_count == 100  # diffusers' example's default
    assert train(**prior, class_images=["aGVsbG8="] * 150).class_image_count == 150
    assert train(**prior, class_images=["aGVsbG8="] * 3, num_class_images=2).class_image_count == 2
    assert "sample_batch_size" not in IGNORED_ARGS
    assert train(**prior, sample_batch_size=8).sample_batch_size == 8


def test_a_training_needs_a_destination_or_a_name() -> None:
    data = {key: value for key, value in BASE.items() if key != "name"}
    assert "give dest_url" in refused(data).message
    assert parse_train_request(data | {"dest_url": "s3:///bucket/key/"}).name is None


def test_the_legacy_envelope_maps_call_inputs_and_model_inputs() -> None:
    model_inputs = {"instance_images": ["aGVsbG8="], "instance_prompt": "sks", "max_train_steps": 5}
    call_inputs = {
        "train": "dreambooth",
        "MODEL_ID": "builtin/tiny-sd",
        "dest_url": "s3:///b/k.safetensors",
        "startRequestId": "r1",
        "SCHEDULER": "DDIM",  # how images are made: a training leaves it
        "safety_checker": True,
    }
    envelope = {"modelInputs": model_inputs, "callInputs": call_inputs}
    assert is_training(envelope)
    request = train_from_legacy(envelope)
    assert (request.model, request.dest_url, request.request_id, request.max_train_steps) == (
        "builtin/tiny-sd",
        "s3:///b/k.safetensors",
        "r1",
        5,
    )
    assert not is_training({"modelInputs": {}, "callInputs": {"train": False}})


def test_the_legacy_envelope_refuses_what_does_not_apply_to_a_training() -> None:
    model_inputs = BASE | {"dest_url": "s3:///b/k"}
    with pytest.raises(InvalidInputs, match=r"callInputs\.lora_weights does not apply to a training"):
        train_from_legacy({"modelInputs": BASE, "callInputs": {"train": "dreambooth", "lora_weights": ["https://x/y"]}})
    with pytest.raises(InvalidInputs, match="dest_url in callInputs or modelInputs, not both"):
        train_from_legacy({"modelInputs": model_inputs, "callInputs": {"train": "dreambooth", "dest_url": "s3:///b/k"}})
    with pytest.raises(InvalidInputs, match="dest_url applies to a training"):
        from_legacy({"modelInputs": {"prompt": "x"}, "callInputs": {"dest_url": "s3:///b/k"}})


def test_lora_weights_take_a_trained_name_but_no_path() -> None:
    assert GenerateRequest(lora_weights="trained/sks-dog").lora_weights[0].url == "trained/sks-dog"  # type: ignore[index]
    with pytest.raises(ValueError, match="trained/<name>"):
        GenerateRequest(lora_weights="trained/../../etc/passwd")
