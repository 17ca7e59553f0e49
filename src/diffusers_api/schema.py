"""Wire models: the native request and response, and the legacy envelope adapter onto them.

One typed request (`GenerateRequest`) serves HTTP, the RunPod handler and the Python client. The legacy
docker-diffusers-api envelope `{"modelInputs": {...}, "callInputs": {...}}` is translated onto it by
`from_legacy`, and results go back out through `to_legacy` or `GenerateResponse.from_result`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import InvalidInputs

ImageFormat = Literal["PNG", "JPEG", "WEBP"]

# Arguments of a pipeline's __call__ that the server owns: a request may not set them.
RESERVED_CALL_ARGS = frozenset(
    {
        "generator",
        "output_type",
        "return_dict",
        "callback",
        "callback_steps",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "ip_adapter_image_embeds",
    }
)


def is_http_url(value: object) -> bool:
    """An http(s) URL, as image inputs, webhooks and adapter files may be given (base64 never holds a colon, and
    a data URI starts with data:)."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _require_http(value: str) -> str:
    if not is_http_url(value):
        raise ValueError("must be an http:// or https:// URL")
    return value


class _AdapterURL(BaseModel):
    """An adapter file's URL. The original server read options after it (`#fname=x.safetensors&scale=0.7`,
    `&token=...`): they are split off here (`_options`), leaving the URL that is downloaded and names the file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    url: str
    _options: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _require_http(value)

    @model_validator(mode="after")
    def _fragment(self) -> _AdapterURL:
        self.url, _, fragment = self.url.partition("#")
        self._options = {name: values[0] for name, values in parse_qs(fragment).items()}
        return self


class LoraWeight(_AdapterURL):
    """A LoRA fused into the model for this request (models/adapters.py)."""

    url: str = Field(description="http(s) URL of a .safetensors LoRA file")
    scale: float | None = Field(
        None, ge=-8, le=8, description="Its weight; default: the request's cross_attention_kwargs.scale, else 1"
    )

    @property
    def fragment_scale(self) -> float | None:
        """The `#scale=` after the URL, a default when neither the LoRA nor the request gives one."""
        given = self._options.get("scale")
        try:
            return float(given) if given is not None else None
        except ValueError:
            raise ValueError(f"scale {given!r} after {self.url} is not a number") from None


class TextualInversion(_AdapterURL):
    """A textual-inversion embedding added to the model's vocabulary for this request (models/adapters.py)."""

    url: str = Field(description="http(s) URL of a .safetensors embedding")
    token: str | None = Field(
        None, min_length=1, max_length=100, description="The word the prompt uses for it; default: the file's own"
    )

    @model_validator(mode="after")
    def _token(self) -> TextualInversion:
        """As the original server: `#token=`, else the `#fname=` without its extension."""
        if self.token is None:
            fname = self._options.get("fname", "").rsplit(".", 1)[0]
            self.token = self._options.get("token", fname) or None
            if self.token is not None and len(self.token) > 100:
                raise ValueError(f"the token after {self.url} is longer than 100 characters")
        return self


# Inputs that only mean something with an input image (the JSON schema says so with dependentRequired).
_NEEDS_IMAGE = {
    "strength": "applies to an input image (img2img, inpainting)",
    "mask_image": "marks what to repaint in an input image",
}
_SIZE = (
    "Image {side} in pixels: a multiple of 8 from 8 to 8192 (MAX_IMAGE_PIXELS bounds width x height), and at least"
    " the model's minimum (its VAE scale factor x its UNet's downsampling x 2: 16 for builtin/tiny-sd, 128 for"
    " SD 1.x/2.x); default: the model's own size"
)


class GenerateRequest(BaseModel):
    """One image-generation request. Names follow diffusers' `__call__` arguments where one exists."""

    # The examples name no model, so that they run as they are on whatever model the server serves (/docs shows
    # the first; tests/integration/test_openapi_examples.py runs them all).
    # allow_inf_nan=False: NaN compares false with every bound, so without it `guidance_scale: NaN` would be
    # refused as "less than or equal to 100"; this way the message says what is wrong with it.
    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=False,
        allow_inf_nan=False,
        json_schema_extra={
            "dependentRequired": {field: ["image"] for field in _NEEDS_IMAGE},
            "examples": [
                {"prompt": "a lighthouse at dusk, oil painting", "num_inference_steps": 20, "seed": 42},
                {
                    "prompt": "a red fox in the snow",
                    "negative_prompt": "blurry, low quality",
                    "num_inference_steps": 25,
                    "guidance_scale": 7.5,
                    "scheduler": "DPM++ 2M Karras",
                    "num_images_per_prompt": 2,
                    "image_format": "JPEG",
                    "image_quality": 90,
                },
            ],
        },
    )

    # --- what runs it ----------------------------------------------------------------------------------------
    model: str | None = Field(None, description="Model id (MODEL_ID); defaults to the served model")
    hf_model_id: str | None = Field(None, description="Hub repository when `model` is only an alias")
    revision: str | None = Field(None, description="MODEL_REVISION")
    variant: str | None = Field(None, description="MODEL_VARIANT (weight-file variant, e.g. fp16)")
    precision: Literal["", "fp16", "bf16", "fp32"] | None = Field(
        None, description="MODEL_PRECISION; defaults to the served model's"
    )
    model_url: str | None = Field(None, description="MODEL_URL: cloud-cache archive")
    checkpoint_url: str | None = Field(None, description="CHECKPOINT_URL: single-file checkpoint")
    pipeline: str | None = Field(None, description="Pipeline class, AutoPipelineFor*, or txt2img / img2img / inpaint")
    scheduler: str | None = Field(None, description="Scheduler class name or alias (e.g. 'Euler a', 'DPM++ 2M')")
    safety_checker: bool = Field(True, description="Run the model's safety checker, if it has one")
    lora_weights: list[LoraWeight] | None = Field(
        None,
        max_length=8,
        description="LoRAs to fuse into the model: URLs, or {url, scale} objects (a single URL may be a string)",
    )
    textual_inversions: list[TextualInversion] | None = Field(
        None,
        max_length=8,
        description="Textual-inversion embeddings to add: URLs, or {url, token} objects (a single URL may be a string)",
    )

    # --- pipeline inputs -------------------------------------------------------------------------------------
    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    width: int | None = Field(None, ge=8, le=8192, multiple_of=8, description=_SIZE.format(side="width"))
    height: int | None = Field(None, ge=8, le=8192, multiple_of=8, description=_SIZE.format(side="height"))
    num_images_per_prompt: int = Field(1, ge=1, le=16)
    strength: float | None = Field(None, ge=0, le=1, description="How much of `image` is repainted (img2img, inpaint)")
    eta: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of the first image; drawn when absent")
    image: str | None = Field(None, description="Input image (base64, data URI or http(s) URL) for img2img / inpaint")
    mask_image: str | None = Field(
        None, description="Inpainting mask (base64, data URI or http(s) URL); white is repainted"
    )
    cross_attention_kwargs: dict[str, Any] | None = None
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Other arguments of the pipeline's __call__, passed through"
    )

    # --- output ----------------------------------------------------------------------------------------------
    image_format: ImageFormat = "PNG"
    image_quality: int | None = Field(None, ge=1, le=100, description="JPEG / WEBP quality")

    # --- bookkeeping and events ------------------------------------------------------------------------------
    request_id: str | None = Field(None, max_length=200, description="Echoed in meta (legacy startRequestId)")
    send_url: str | None = Field(None, max_length=2000, description="Webhook for this request's events (SEND_URL)")
    sign_key: SecretStr | None = Field(None, description="HMAC-SHA256 key for this request's webhooks (SIGN_KEY)")
    stream_events: bool = Field(False, description="Answer with NDJSON: events, progress, then the result")
    callback_steps: int | None = Field(None, ge=1, le=1000, description="A progress event every N steps")

    @field_validator("send_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return _require_http(value) if value else None

    @field_validator("lora_weights", "textual_inversions", mode="before")
    @classmethod
    def _url_list(cls, value: object) -> object:
        if isinstance(value, str | dict):  # one of them, not in a list
            value = [value]
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _lora_scales(self) -> GenerateRequest:
        """diffusers (and the original server) weigh LoRAs with `cross_attention_kwargs.scale`. Here LoRAs are
        fused at their scales before the call, so that scale becomes the weight of every LoRA that does not give
        its own (an object's `scale`), and is taken out of the call's arguments. As in the original, it wins over
        a `#scale=` after the URL, and 1 is the weight when neither is given."""
        kwargs = dict(self.cross_attention_kwargs or {})
        if not self.lora_weights:
            if "scale" in kwargs:  # it would mean nothing (and diffusers' text encoder scaling fails without LoRAs)
                raise ValueError("cross_attention_kwargs.scale weighs LoRA weights, and this request names none")
            return self
        given = kwargs.pop("scale", None)
        for lora in self.lora_weights:
            if lora.scale is None:
                fragment = lora.fragment_scale
                lora.scale = float(given) if given is not None else (fragment if fragment is not None else 1.0)
            if not -8 <= lora.scale <= 8:
                raise ValueError(f"the scale of LoRA {lora.url} is {lora.scale}; it must be between -8 and 8")
        self.cross_attention_kwargs = kwargs or None
        return self

    @model_validator(mode="after")
    def _image_inputs_need_an_image(self) -> GenerateRequest:
        missing = [field for field in _NEEDS_IMAGE if getattr(self, field) is not None] if self.image is None else []
        if missing:  # a custom error: a ValueError's message would start with "Value error, "
            message = f"{missing[0]}: {_NEEDS_IMAGE[missing[0]]}, and this request has none"
            raise PydanticCustomError("needs_image", message)
        return self

    @field_validator("image_format", mode="before")
    @classmethod
    def _upper_format(cls, value: object) -> object:
        if isinstance(value, str):
            upper = value.strip().upper()
            return "JPEG" if upper == "JPG" else upper
        return value

    @field_validator("cross_attention_kwargs", mode="before")
    @classmethod
    def _parse_json_kwargs(cls, value: object) -> object:
        # The original accepted a JSON string here; keep accepting it.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc.msg}") from exc
        return value

    @field_validator("extra")
    @classmethod
    def _no_reserved_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_CALL_ARGS & value.keys())
        if reserved:
            raise ValueError(f"set by the server, not by a request: {', '.join(reserved)}")
        return value

    @property
    def image_count(self) -> int:
        prompts = len(self.prompt) if isinstance(self.prompt, list) else 1
        return prompts * self.num_images_per_prompt


def parse_request(data: Any) -> GenerateRequest:
    """Validate a native request, reporting every problem at once as INVALID_INPUTS."""
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputs(describe_validation_error(exc), errors=_error_list(exc)) from None


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{prefix}{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def _error_list(exc: ValidationError) -> list[dict[str, str]]:
    return [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()]


# --- results -----------------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """What the runner returns: encoded images and their seeds, plus meta, timings and memory use."""

    images: list[bytes]
    image_format: str
    seeds: list[int]
    nsfw: list[bool] | None
    meta: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    mem_usage: float = 0.0


class ImageOut(BaseModel):
    data: str = Field(description="base64 of the encoded image")
    format: str
    seed: int
    nsfw: bool | None = None


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    meta: dict[str, Any]
    timings: dict[str, float]
    mem_usage: float

    @classmethod
    def from_result(cls, result: GenerateResult) -> GenerateResponse:
        from .imaging import to_base64

        nsfw: list[bool | None] = list(result.nsfw) if result.nsfw else [None] * len(result.images)
        images = [
            ImageOut(data=to_base64(data), format=result.image_format.lower(), seed=seed, nsfw=flag)
            for data, seed, flag in zip(result.images, result.seeds, nsfw, strict=True)
        ]
        return cls(images=images, meta=result.meta, timings=result.timings, mem_usage=result.mem_usage)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- jobs (/v1/jobs) ---------------------------------------------------------------------------------------

JobState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]


class JobProgress(BaseModel):
    stage: Literal["queued", "starting", "inference", "finishing", "done"] = Field(
        description="queued: waiting for a slot; starting: model, inputs and prompts; inference: denoising; "
        "finishing: decoding and encoding the images; done: completed"
    )
    step: int | None = Field(None, description="Denoising steps done")
    steps: int | None = Field(None, description="Denoising steps in all")
    eta_s: float | None = Field(None, description="Seconds the remaining steps will take at the pace so far")


class JobStatus(BaseModel):
    id: str
    status: JobState
    events_url: str = Field(
        description="The job's server-sent events; with API_KEY set it carries a token that opens this stream alone,"
        " for clients that cannot send an Authorization header (a browser's EventSource)"
    )
    created_at: float = Field(description="Unix time the job was queued")
    started_at: float | None = Field(None, description="Unix time it left the queue")
    finished_at: float | None = Field(None, description="Unix time it ended")
    progress: JobProgress
    result: GenerateResponse | None = Field(None, description="The images, once COMPLETED")
    error: dict[str, Any] | None = Field(None, description="`{code, message, ...}` when FAILED or CANCELLED")


# --- the legacy envelope -----------------------------------------------------------------------------------

# callInputs key -> GenerateRequest field
_LEGACY_CALL_INPUTS = {
    "MODEL_ID": "model",
    "HF_MODEL_ID": "hf_model_id",
    "MODEL_REVISION": "revision",
    "MODEL_VARIANT": "variant",
    "MODEL_PRECISION": "precision",
    "MODEL_URL": "model_url",
    "CHECKPOINT_URL": "checkpoint_url",
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
}
# callInputs the server knows but this build does not act on: refused with a clear message rather than ignored,
# so that nobody believes such an option was applied when it was not.
_LEGACY_UNSUPPORTED = (
    "train",
    "use_extra",
    "attn_procs",
    "compel_prompts",
    "custom_pipeline_method",
)
# callInputs that were speed hints in the original; PyTorch's SDPA attention makes them moot.
_LEGACY_IGNORED = ("xformers_memory_efficient_attention",)
# modelInputs keys with a typed field (plus the legacy alias init_image -> image)
_TYPED_MODEL_INPUTS = set(GenerateRequest.model_fields) - set(_LEGACY_CALL_INPUTS.values()) - {"extra"}


def decode_envelope(body: bytes | str | Any) -> dict[str, Any]:
    """Parse a legacy body: a JSON object, or a JSON string holding one (old Banana clients double-encode)."""
    data = body
    for _ in range(2):
        if isinstance(data, bytes | bytearray | str):
            try:
                data = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidInputs(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInputs("request body must be a JSON object with 'modelInputs' and 'callInputs'")
    return data


def from_legacy(envelope: dict[str, Any]) -> GenerateRequest:
    """Translate `{"modelInputs", "callInputs"}` onto a GenerateRequest, or raise INVALID_INPUTS."""
    missing = [key for key in ("modelInputs", "callInputs") if key not in envelope]
    if missing:
        raise InvalidInputs(f"missing required key(s): {', '.join(missing)}", missing=missing)
    model_inputs, call_inputs = envelope["modelInputs"], envelope["callInputs"]
    for key, value in (("modelInputs", model_inputs), ("callInputs", call_inputs)):
        if not isinstance(value, dict):
            raise InvalidInputs(f"{key} must be an object, got {type(value).__name__}")
    data = _legacy_call_inputs(call_inputs) | _legacy_model_inputs(model_inputs)
    if call_inputs.get("is_url"):
        for field in ("image", "mask_image"):
            value = data.get(field)
            if value is not None and not is_http_url(value):
                raise InvalidInputs(f"callInputs.is_url is true, so modelInputs.{field} must be an http(s) URL")
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as exc:
        message = describe_validation_error(exc)
        raise InvalidInputs(message, errors=_error_list(exc)) from None


def _legacy_call_inputs(call_inputs: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in call_inputs.items():
        if key in _LEGACY_CALL_INPUTS:
            data[_LEGACY_CALL_INPUTS[key]] = value
        elif key == "is_url":
            continue  # read by from_legacy: the image inputs are URLs
        elif key in _LEGACY_IGNORED:
            continue
        elif key in _LEGACY_UNSUPPORTED:
            if value not in (None, "", False):
                raise InvalidInputs(f"callInputs.{key} is not supported by this server yet")
        else:
            known = sorted([*_LEGACY_CALL_INPUTS, "is_url", *_LEGACY_UNSUPPORTED, *_LEGACY_IGNORED])
            raise InvalidInputs(f"callInputs.{key} is not a known call input", known=known)
    return data


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
    from .imaging import to_base64

    encoded = [to_base64(data) for data in result.images]
    body: dict[str, Any] = {"image_base64": encoded[0]} if len(encoded) == 1 else {"images_base64": encoded}
    if result.nsfw is not None:
        body["nsfw_content_detected"] = result.nsfw
    body["$meta"] = result.meta
    body["$timings"] = result.timings
    body["$mem_usage"] = result.mem_usage
    return body
