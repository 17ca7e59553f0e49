"""The docker-diffusers-api envelope `{"modelInputs": {...}, "callInputs": {...}}`: translated onto the native
request by `from_legacy`, and results back out by `to_legacy`, as the original's clients expect them.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInputs
from .request import (
    _NEEDS_IMAGE,
    LPW_PIPELINE,
    GenerateRequest,
    check_unicode,
    is_http_url,
    loads_json,
    validate_inputs,
)
from .response import GenerateResult
from .train import TrainRequest, TrainResult, parse_train_request
from .upscale import UpscaleRequest, parse_upscale_request

# callInputs key -> GenerateRequest field
_LEGACY_CALL_INPUTS = {
    "MODEL_ID": "model",
    "HF_MODEL_ID": "hf_model_id",
    "MODEL_REVISION": "revision",
    "MODEL_VARIANT": "variant",
    "MODEL_PRECISION": "precision",
    "MODEL_URL": "model_url",
    "CHECKPOINT_URL": "checkpoint_url",
    "CHECKPOINT_CONFIG_URL": "checkpoint_config_url",
    "PIPELINE": "pipeline",
    "SCHEDULER": "scheduler",
    "safety_checker": "safety_checker",
    "image_format": "image_format",
    "image_quality": "image_quality",
    "startRequestId": "request_id",
    "SEND_URL": "send_url",
    "SIGN_KEY": "sign_key",
    "streamEvents": "stream_events",
    "lora_weights": "lora_weights",
    "textual_inversions": "textual_inversions",
    "FILL_MODE": "fill_mode",
}
# The original's name for a LoRA file (it loaded it with `unet.load_attn_procs`): one more of lora_weights.
_LEGACY_LORA_ALIAS = "attn_procs"
# callInputs the server knows but this build does not act on: refused with a clear message rather than ignored,
# so that nobody believes such an option was applied when it was not.
_LEGACY_UNSUPPORTED: tuple[str, ...] = ()
# use_extra: the original's extras, run instead of the pipeline. Only "upsample" exists here (`upscale_from_legacy`).
USE_EXTRA = ("upsample",)
# use_extra "upsample": modelInputs and callInputs it reads -> UpscaleRequest field
_UPSAMPLE_MODEL_INPUTS = {"input_image": "image", "face_enhance": "face_enhance", "scale": "scale"}
_UPSAMPLE_CALL_INPUTS = {
    key: _LEGACY_CALL_INPUTS[key]
    for key in ("MODEL_ID", "image_format", "image_quality", "startRequestId", "SEND_URL", "SIGN_KEY", "streamEvents")
}
# callInputs that choose how prompts are read (`_prompt_options`): compel_prompts -> prompt_weighting "compel";
# PIPELINE lpw_stable_diffusion with custom_pipeline_method -> long prompts, A1111 weighting, that task's pipeline.
_LPW_METHODS = {"text2img": "txt2img", "img2img": "img2img", "inpaint": "inpaint"}
_LEGACY_PROMPT_INPUTS = {
    "compel_prompts": {
        "anyOf": [{"type": "boolean"}, {"type": "null"}],
        "description": "read the prompts in compel's weighting syntax",
    },
    "custom_pipeline_method": {
        "enum": [*_LPW_METHODS, None, ""],
        "description": f"with PIPELINE {LPW_PIPELINE}: which task runs",
    },
}
# callInputs that were speed hints in the original; PyTorch's SDPA attention makes them moot.
_LEGACY_IGNORED = ("xformers_memory_efficient_attention",)
# modelInputs keys with a typed field (plus the legacy alias init_image -> image)
_TYPED_MODEL_INPUTS = set(GenerateRequest.model_fields) - set(_LEGACY_CALL_INPUTS.values()) - {"extra"}


def legacy_envelope_schema(ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """The JSON schema of the envelope as `from_legacy` reads it, from GenerateRequest's fields: modelInputs has the
    typed pipeline inputs and takes any other argument of the pipeline's __call__; callInputs has the keys it
    knows and no other."""
    fields = GenerateRequest.model_json_schema(ref_template=ref_template)["properties"]
    model_inputs = {name: fields[name] for name in sorted(_TYPED_MODEL_INPUTS)} | {"init_image": fields["image"]}
    call_inputs = {key: fields[name] for key, name in _LEGACY_CALL_INPUTS.items()}
    call_inputs["is_url"] = {"type": "boolean", "description": "image and mask_image are http(s) URLs"}
    call_inputs[_CONTROLNET_KEY] = {
        "type": "string",
        "description": "ControlNet model; modelInputs.image is its condition",
    }
    call_inputs[_LEGACY_LORA_ALIAS] = {
        "anyOf": [{"type": "string", "pattern": "^https?://"}, {"enum": [None, "", False]}],
        "description": "URL of a LoRA file, as one more of lora_weights (the original's attn_procs)",
    }
    call_inputs |= _LEGACY_PROMPT_INPUTS
    call_inputs |= {key: {"enum": [None, "", False], "description": "not supported"} for key in _LEGACY_UNSUPPORTED}
    call_inputs["use_extra"] = {
        "enum": [None, "", False, *USE_EXTRA],
        "description": "upsample: upscale modelInputs.input_image with the upscaler MODEL_ID (see POST /v1/upscale)",
    }
    call_inputs |= {key: {"description": "ignored"} for key in _LEGACY_IGNORED}
    call_inputs["train"] = {"enum": [None, "", False, "dreambooth"], "description": "modelInputs are training args"}
    call_inputs["dest_url"] = {"type": "string", "description": "training: s3:// URL the result is uploaded to"}
    with_an_image = {"anyOf": [{"required": ["image"]}, {"required": ["init_image"]}]}
    return {
        "type": "object",
        "required": ["modelInputs", "callInputs"],
        "properties": {
            "modelInputs": {
                "type": "object",
                "description": "the pipeline's __call__ arguments",
                "properties": model_inputs,
                "additionalProperties": True,
                "dependentSchemas": {field: with_an_image for field in _NEEDS_IMAGE if field in model_inputs},
            },
            "callInputs": {
                "type": "object",
                "description": "MODEL_ID, PIPELINE, SCHEDULER, ...",
                "properties": call_inputs,
                "additionalProperties": False,
            },
        },
    }


def decode_envelope(body: bytes | str | Any) -> dict[str, Any]:
    """Parse a legacy body: a JSON object, or a JSON string holding one (old Banana clients double-encode)."""
    data = body
    for _ in range(2):
        if isinstance(data, bytes | bytearray | str):
            data = loads_json(data)
    if not isinstance(data, dict):
        raise InvalidInputs("request body must be a JSON object with 'modelInputs' and 'callInputs'")
    return data


def from_legacy_envelope(envelope: dict[str, Any]) -> GenerateRequest | UpscaleRequest:
    """The request an envelope makes: an upscale with `callInputs.use_extra: "upsample"`, else a generation."""
    model_inputs, call_inputs = _envelope_parts(envelope)
    if call_inputs.get("use_extra") == "upsample":
        return upscale_from_legacy(model_inputs, call_inputs)
    return from_legacy(envelope)


def _envelope_parts(envelope: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    missing = [key for key in ("modelInputs", "callInputs") if key not in envelope]
    if missing:
        raise InvalidInputs(f"missing required key(s): {', '.join(missing)}", missing=missing)
    model_inputs, call_inputs = envelope["modelInputs"], envelope["callInputs"]
    for key, value in (("modelInputs", model_inputs), ("callInputs", call_inputs)):
        if not isinstance(value, dict):
            raise InvalidInputs(f"{key} must be an object, got {type(value).__name__}")
    check_unicode(envelope)  # before any of its keys is named in an error message
    return model_inputs, call_inputs


def upscale_from_legacy(model_inputs: dict[str, Any], call_inputs: dict[str, Any]) -> UpscaleRequest:
    """`use_extra: "upsample"`, as the original read it: modelInputs.input_image (base64) and face_enhance, the
    upscaler named by callInputs.MODEL_ID. Inputs it does not read are refused, not ignored."""
    data: dict[str, Any] = {}
    for where, given, known in (
        ("modelInputs", model_inputs, _UPSAMPLE_MODEL_INPUTS),
        ("callInputs", call_inputs, _UPSAMPLE_CALL_INPUTS | {"use_extra": ""}),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise InvalidInputs(
                f"use_extra 'upsample' does not read {where}.{', '.join(unknown)}", unknown=unknown, known=sorted(known)
            )
        data |= {known[key]: value for key, value in given.items() if known[key] and value is not None}
    if "image" not in data:
        raise InvalidInputs("use_extra 'upsample' needs modelInputs.input_image (base64)", field="input_image")
    return parse_upscale_request(data)


def from_legacy(envelope: dict[str, Any]) -> GenerateRequest:
    """Translate `{"modelInputs", "callInputs"}` onto a GenerateRequest, or raise INVALID_INPUTS."""
    model_inputs, call_inputs = _envelope_parts(envelope)
    data = _legacy_call_inputs(call_inputs) | _legacy_model_inputs(model_inputs)
    data |= _prompt_options(call_inputs, data)
    if call_inputs.get(_CONTROLNET_KEY):
        _legacy_controlnet(call_inputs[_CONTROLNET_KEY], data)
    if call_inputs.get("is_url"):
        for field in ("image", "mask_image"):
            value = data.get(field)
            if value is not None and not is_http_url(value):
                raise InvalidInputs(f"callInputs.is_url is true, so modelInputs.{field} must be an http(s) URL")
    return validate_inputs(GenerateRequest, data)


def _legacy_call_inputs(call_inputs: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in call_inputs.items():
        if key in _LEGACY_CALL_INPUTS:
            data[_LEGACY_CALL_INPUTS[key]] = value
        elif key in ("is_url", _CONTROLNET_KEY) or (key == "train" and value in (None, "", False)):
            continue  # is_url and CONTROLNET_MODEL_ID are read by from_legacy
        elif key == "dest_url":
            raise InvalidInputs("callInputs.dest_url applies to a training (callInputs.train: dreambooth)")
        elif key == "train":  # a training is read by train_from_legacy (POST /, the RunPod worker), not here
            raise InvalidInputs(f"callInputs.train {value!r} makes a training: send it to POST / or the RunPod worker")
        elif key == _LEGACY_LORA_ALIAS:
            continue  # added after the loop, to whatever lora_weights gives
        elif key == "use_extra":
            _check_no_extra(value)
        elif key in _LEGACY_IGNORED or key in _LEGACY_PROMPT_INPUTS:
            continue  # the prompt inputs are read by _prompt_options
        elif key in _LEGACY_UNSUPPORTED:
            if value not in (None, "", False):
                raise InvalidInputs(f"callInputs.{key} is not supported by this server yet")
        else:
            known = [*_LEGACY_CALL_INPUTS, "is_url", "use_extra", "train", "dest_url", _LEGACY_LORA_ALIAS]
            known += [*_LEGACY_PROMPT_INPUTS, _CONTROLNET_KEY]
            known = sorted([*known, *_LEGACY_UNSUPPORTED, *_LEGACY_IGNORED])
            raise InvalidInputs(f"callInputs.{key} is not a known call input", known=known)
    attn_procs = call_inputs.get(_LEGACY_LORA_ALIAS)
    if not (attn_procs is None or attn_procs is False or attn_procs == ""):  # 0 is no "off" (the schema says so)
        if not is_http_url(attn_procs):
            raise InvalidInputs(f"callInputs.{_LEGACY_LORA_ALIAS} must be the http(s) URL of a LoRA file")
        loras = data.get("lora_weights") or []
        data["lora_weights"] = [*(loras if isinstance(loras, list) else [loras]), attn_procs]
    return data


# The original ran StableDiffusionControlNet*Pipeline with callInputs.CONTROLNET_MODEL_ID and the condition in
# modelInputs.image (txt2img) or modelInputs.control_image (img2img, inpaint: there `image` is the init image).
_CONTROLNET_KEY = "CONTROLNET_MODEL_ID"
_CONTROL_ARGS = {
    "controlnet_conditioning_scale": "scale",
    "control_guidance_start": "start",
    "control_guidance_end": "end",
}


def _legacy_controlnet(model_id: object, data: dict[str, Any]) -> None:
    """CONTROLNET_MODEL_ID and its modelInputs onto `controlnet` (one entry); a ControlNet PIPELINE name onto the
    pipeline it conditions (StableDiffusionControlNetImg2ImgPipeline -> StableDiffusionImg2ImgPipeline)."""
    if not isinstance(model_id, str):
        raise InvalidInputs(f"callInputs.{_CONTROLNET_KEY} must be a string")
    if data.get("controlnet") is not None:
        raise InvalidInputs(f"give modelInputs.controlnet or callInputs.{_CONTROLNET_KEY}, not both")
    pipeline, extra = data.get("pipeline"), data.get("extra") or {}
    if isinstance(pipeline, str) and "ControlNet" in pipeline:
        data["pipeline"] = pipeline.replace("ControlNet", "")
    if "control_image" in extra:
        condition = extra.pop("control_image")
    elif data.get("mask_image") is not None or "Img2Img" in str(pipeline):
        raise InvalidInputs(f"callInputs.{_CONTROLNET_KEY} with an init image: give the condition in control_image")
    elif "image" in data:
        condition = data.pop("image")
    else:
        raise InvalidInputs(f"callInputs.{_CONTROLNET_KEY}: modelInputs.image (the conditioning image) is missing")
    control = {"model": model_id, "image": condition}
    control |= {field: extra.pop(arg) for arg, field in _CONTROL_ARGS.items() if arg in extra}
    data["controlnet"] = [control]
    if "extra" in data and not extra:
        del data["extra"]


# callInputs a training takes (the others of _LEGACY_CALL_INPUTS choose how images are made: a training ignores
# them, since clients send their defaults with every call)
_TRAIN_CALL_INPUTS = (
    *("MODEL_ID", "HF_MODEL_ID", "MODEL_REVISION", "MODEL_VARIANT", "MODEL_PRECISION", "MODEL_URL"),
    *("CHECKPOINT_URL", "CHECKPOINT_CONFIG_URL", "startRequestId", "SEND_URL", "SIGN_KEY"),
)
_NOT_FOR_TRAINING = (
    "lora_weights",
    "textual_inversions",
    "streamEvents",
    "use_extra",
    _LEGACY_LORA_ALIAS,
    *_LEGACY_PROMPT_INPUTS,
    *_LEGACY_UNSUPPORTED,
)


def is_training(envelope: dict[str, Any]) -> bool:
    """`callInputs.train` is set: the envelope asks for a training (modelInputs are its arguments)."""
    call_inputs = envelope.get("callInputs")
    return isinstance(call_inputs, dict) and call_inputs.get("train") not in (None, "", False)


def train_from_legacy(envelope: dict[str, Any]) -> TrainRequest:
    """`{"modelInputs": {instance_images, instance_prompt, ...}, "callInputs": {"train": "dreambooth", dest_url,
    MODEL_ID, ...}}` as a TrainRequest, or INVALID_INPUTS."""
    model_inputs, call_inputs = envelope.get("modelInputs"), envelope["callInputs"]
    if not isinstance(model_inputs, dict):
        raise InvalidInputs("modelInputs must be an object holding the training arguments")
    check_unicode(envelope)
    data: dict[str, Any] = {"train": call_inputs["train"]}
    for key, value in call_inputs.items():
        if key in _TRAIN_CALL_INPUTS:
            data[_LEGACY_CALL_INPUTS[key]] = value
        elif key == "dest_url":
            data["dest_url"] = value
        elif key in _NOT_FOR_TRAINING and value not in (None, "", False):
            raise InvalidInputs(f"callInputs.{key} does not apply to a training")
    overlap = sorted(set(data) & set(model_inputs) - {"train"})
    if overlap:
        raise InvalidInputs(f"give {', '.join(overlap)} in callInputs or modelInputs, not both")
    return parse_train_request(model_inputs | data)


def _check_no_extra(value: Any) -> None:
    """A generation names no extra; "upsample" is answered by `from_legacy_envelope` (POST /, RunPod), not here."""
    if value in (None, "", False):
        return
    if value in USE_EXTRA:
        raise InvalidInputs(f"callInputs.use_extra {value!r} is answered by POST / and the RunPod worker only")
    raise InvalidInputs(
        f"callInputs.use_extra {value!r} is not an extra of this server; allowed: {', '.join(USE_EXTRA)}",
        field="use_extra",
        allowed=list(USE_EXTRA),
    )


def _prompt_options(call_inputs: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """compel_prompts and lpw_stable_diffusion's custom_pipeline_method as the native options."""
    options: dict[str, Any] = {}
    compel = call_inputs.get("compel_prompts")
    if compel is not None and not isinstance(compel, bool):
        raise InvalidInputs(f"callInputs.compel_prompts must be true or false, not {compel!r}")
    if compel:
        options["prompt_weighting"] = "compel"
    method = call_inputs.get("custom_pipeline_method")
    if method in (None, ""):
        return options
    if call_inputs.get("PIPELINE") != LPW_PIPELINE:
        raise InvalidInputs(f"callInputs.custom_pipeline_method applies to PIPELINE {LPW_PIPELINE} only")
    if not isinstance(method, str) or method not in _LPW_METHODS:  # a list or an object cannot be looked up
        raise InvalidInputs(
            f"callInputs.custom_pipeline_method must be one of {', '.join(_LPW_METHODS)}, not {method!r}",
            accepted=list(_LPW_METHODS),
        )
    weighting = options.get("prompt_weighting") or data.get("prompt_weighting") or "a1111"
    return options | {"pipeline": _LPW_METHODS[method], "long_prompts": True, "prompt_weighting": weighting}


def _legacy_model_inputs(model_inputs: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in model_inputs.items():
        if key == "init_image":
            if "image" in model_inputs:
                raise InvalidInputs("modelInputs: give 'image' or 'init_image', not both")
            data["image"] = value
        elif key in _TYPED_MODEL_INPUTS:
            data[key] = value
        else:
            extra[key] = value
    if extra:
        data["extra"] = extra
    return data


def to_legacy(result: GenerateResult) -> dict[str, Any]:
    """The docker-diffusers-api response: image_base64 (one) or images_base64 (several) plus $meta etc."""
    from ..imaging import to_base64

    encoded = [to_base64(data) for data in result.images]
    body: dict[str, Any] = {"image_base64": encoded[0]} if len(encoded) == 1 else {"images_base64": encoded}
    if result.nsfw is not None:
        body["nsfw_content_detected"] = result.nsfw
    body["$meta"] = result.meta
    body["$timings"] = result.timings
    body["$mem_usage"] = result.mem_usage
    return body


def to_legacy_training(result: TrainResult) -> dict[str, Any]:
    """What the original answered after a training (`done: true`), with where the result went."""
    body = result.model_dump(exclude={"meta", "timings"}, exclude_none=True)
    return {"done": True, **body, "$meta": result.meta, "$timings": result.timings}
