"""The native request: `GenerateRequest`, its adapters (LoRAs, textual inversions), and parsing it from JSON.

One typed request serves HTTP, the RunPod handler and the Python client; the legacy envelope is translated onto it
(legacy.py). Its constraints are those a JSON schema can state; what needs the model is checked by the runner.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, TypeVar
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
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

from ..errors import InvalidInputs
from .controls import MAX_CONTROLS, ControlInput, controls_schema
from .ip_adapter import IPAdapter

ImageFormat = Literal["PNG", "JPEG", "WEBP", "JXL"]
FillMode = Literal["none", "patchmatch", "edge"]
# The original server's community pipeline for long, A1111-weighted prompts: here a name for those two options.
LPW_PIPELINE = "lpw_stable_diffusion"

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
        "ip_adapter_image",
        "ip_adapter_image_embeds",
        # Flux's image prompt for true CFG: an IP-Adapter's too, which the request's `ip_adapter` gives
        "negative_ip_adapter_image",
        "negative_ip_adapter_image_embeds",
    }
)


def is_http_url(value: object) -> bool:
    """An http(s) URL, as image inputs, webhooks and adapter files may be given (base64 never holds a colon, and
    a data URI starts with data:)."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


ModelT = TypeVar("ModelT", bound=BaseModel)

# The same rule in the JSON schema (pattern only constrains strings, so it also suits an optional field); a
# pattern in Field would replace the validator's message with "String should match pattern".
_HTTP_PATTERN: JsonDict = {"pattern": "^https?://"}
# A training's result kept in MODELS_DIR (schema/train.py): `trained/<name>`, a model id or a lora_weights entry.
TRAINED_PREFIX = "trained/"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# A weight-file variant (`unet/diffusion_pytorch_model.<variant>.safetensors`): a word, so that no `/` or `..` in it
# reaches a file name; empty is none, as clients of the original send MODEL_VARIANT.
VARIANT_PATTERN = r"^[A-Za-z0-9_-]{0,64}$"
_LORA_PATTERN: JsonDict = {"pattern": "^(https?://|trained/)"}


def is_trained_name(value: str) -> bool:
    """`trained/<name>`: a training's result kept in MODELS_DIR."""
    return value.startswith(TRAINED_PREFIX) and re.match(NAME_PATTERN, value[len(TRAINED_PREFIX) :]) is not None


def _adapters_schema(schema: dict[str, Any], pattern: JsonDict = _HTTP_PATTERN) -> None:
    """The JSON schema of `lora_weights` and `textual_inversions` as the server reads them (`_url_list`): a list of
    URLs or objects, or one of them alone."""
    listed, null = schema["anyOf"]
    url = {"type": "string", **pattern}
    one = listed["items"]
    listed["items"] = {"anyOf": [url, one]}
    schema["anyOf"] = [listed, url, one, null]


def _loras_schema(schema: dict[str, Any]) -> None:
    _adapters_schema(schema, _LORA_PATTERN)


def _json_object_schema(schema: dict[str, Any]) -> None:
    """`cross_attention_kwargs` may also be given as a string of JSON, as the original server took it."""
    schema["anyOf"].insert(1, {"type": "string", "description": "the object as a string of JSON"})


def _require_http(value: str) -> str:
    if not is_http_url(value):
        raise ValueError("must be an http:// or https:// URL")
    return value


def loads_json(text: str | bytes | bytearray, what: str = "request body") -> Any:
    """`json.loads`, every way that JSON a client sent can fail to load as INVALID_INPUTS naming `what`: not JSON,
    not UTF-8 (both ValueErrors), an integer of more than 4300 digits (a ValueError too), or nesting deeper than
    the parser's recursion allows (a RecursionError, which would otherwise answer 500)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputs(f"{what} is not valid JSON: {exc}") from None


def valid_unicode(cls: type, data: Any) -> Any:
    """A `mode="before"` model validator: `unicode_problem` as a validation error."""
    problem = unicode_problem(data)
    if problem is not None:
        raise PydanticCustomError("unicode", problem)
    return data


def check_unicode(data: Any) -> None:
    """`unicode_problem` as INVALID_INPUTS, for what is read before a model validates it (the legacy envelope)."""
    problem = unicode_problem(data)
    if problem is not None:
        raise InvalidInputs(problem)


def unicode_problem(data: Any) -> str | None:
    """What is wrong, if a string of a request (a key too) is not Unicode that can be written as UTF-8. JSON's
    escapes can spell half a surrogate pair ("\\ud800"), which Python reads into a string that no UTF-8 encoder
    takes: echoed in an error message or a result it made the response a 500, and tokenizers refused it with a
    TypeError. Iterative: a body may nest as deep as the JSON parser allows."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, dict):
            pending += [(_place(where, key), key) for key in value]
            pending += [(_place(where, key), item) for key, item in value.items()]
        elif isinstance(value, list):
            pending += [(_place(where, index), item) for index, item in enumerate(value)]
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError as exc:
                lone = value[exc.start].encode("utf-8", "backslashreplace").decode()
                return f"{where or 'body'}: not valid Unicode (a lone surrogate, {lone}); send UTF-8 text"
    return None


def _place(where: str, key: object) -> str:
    name = str(key).encode("utf-8", "backslashreplace").decode()
    return f"{where}.{name}" if where else name


def optional_http_url(value: str | None) -> str | None:
    """A webhook URL (`send_url`): http(s), or none (an empty one is none)."""
    return _require_http(value) if value else None


def upper_image_format(value: object) -> object:
    """`image_format` in any case, `jpg` for JPEG."""
    if isinstance(value, str):
        upper = value.strip().upper()
        return "JPEG" if upper == "JPG" else upper
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

    url: str = Field(
        description="http(s) URL of a .safetensors LoRA file, or trained/<name> of a LoRA trained here",
        json_schema_extra=_LORA_PATTERN,
    )
    scale: float | None = Field(
        None, ge=-8, le=8, description="Its weight; default: the request's cross_attention_kwargs.scale, else 1"
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if is_trained_name(value):
            return value
        if not is_http_url(value):
            raise ValueError("must be an http:// or https:// URL, or trained/<name> of a LoRA trained here")
        return value

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

    url: str = Field(description="http(s) URL of a .safetensors embedding", json_schema_extra=_HTTP_PATTERN)
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
    "fill_mode": "pre-fills the transparent (or masked) area of an input image",
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
    variant: str | None = Field(
        None,
        pattern=VARIANT_PATTERN,
        description="MODEL_VARIANT (weight-file variant, e.g. fp16: the weight files' names hold it)",
    )
    precision: Literal["", "fp16", "bf16", "fp32"] | None = Field(
        None, description="MODEL_PRECISION; defaults to the served model's"
    )
    model_url: str | None = Field(None, description="MODEL_URL: cloud-cache archive")
    checkpoint_url: str | None = Field(None, description="CHECKPOINT_URL: single-file checkpoint")
    checkpoint_config_url: str | None = Field(
        None, description="CHECKPOINT_CONFIG_URL: original-SD .yaml config to convert checkpoint_url with"
    )
    pipeline: str | None = Field(None, description="Pipeline class, AutoPipelineFor*, or txt2img / img2img / inpaint")
    scheduler: str | None = Field(None, description="Scheduler class name or alias (e.g. 'Euler a', 'DPM++ 2M')")
    safety_checker: bool = Field(True, description="Run the model's safety checker, if it has one")
    lora_weights: list[LoraWeight] | None = Field(
        None,
        max_length=8,
        description="LoRAs to fuse into the model: URLs (or trained/<name>), or {url, scale} objects (a single URL "
        "may be a string)",
        json_schema_extra=_loras_schema,
    )
    textual_inversions: list[TextualInversion] | None = Field(
        None,
        max_length=8,
        description="Textual-inversion embeddings to add: URLs, or {url, token} objects (a single URL may be a string)",
        json_schema_extra=_adapters_schema,
    )

    # --- pipeline inputs -------------------------------------------------------------------------------------
    prompt: str | Annotated[list[str], Field(min_length=1)] | None = None  # an empty list makes no image
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
    fill_mode: FillMode | None = Field(
        None,
        description="Outpainting: before inpainting, fill the image's transparent area (else the mask's) with"
        " patchmatch or edge (nearest opaque pixel); the transparent area is the mask when mask_image is absent."
        " Default: the server's FILL_MODE for inpainting requests",
    )
    ip_adapter: IPAdapter | None = Field(
        None, description="An image prompt: IP-Adapter, image(s) and scale (SD 1.x/2.x and SDXL models)"
    )
    cross_attention_kwargs: dict[str, Any] | None = Field(None, json_schema_extra=_json_object_schema)
    controlnet: list[ControlInput] | None = Field(
        None,
        min_length=1,
        max_length=MAX_CONTROLS,
        description="ControlNets or T2I-Adapters with their conditioning images (one object, or a list of up to 4)",
        json_schema_extra=controls_schema,
    )
    prompt_weighting: Literal["compel", "a1111"] | None = Field(
        None,
        description="Read weights in the prompts: compel's syntax ((word)1.3, word++, .and(), .blend()) or A1111's"
        " ((word:1.3), (word), [word], BREAK); SD and SDXL models. Default: plain text",
    )
    long_prompts: bool = Field(
        False, description="Encode prompts longer than 77 tokens in chunks instead of cutting them (SD and SDXL)"
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Other arguments of the pipeline's __call__, passed through"
    )

    # --- output ----------------------------------------------------------------------------------------------
    image_format: ImageFormat = Field("PNG", description="PNG, JPEG, WEBP, or JXL (JPEG XL: needs pillow-jxl-plugin)")
    image_quality: int | None = Field(None, ge=1, le=100, description="JPEG / WEBP / JXL quality")

    # --- bookkeeping and events ------------------------------------------------------------------------------
    request_id: str | None = Field(None, max_length=200, description="Echoed in meta (legacy startRequestId)")
    send_url: str | None = Field(
        None,
        max_length=2000,
        description="Webhook for this request's events (SEND_URL)",
        json_schema_extra=_HTTP_PATTERN,
    )
    sign_key: SecretStr | None = Field(None, description="HMAC-SHA256 key for this request's webhooks (SIGN_KEY)")
    stream_events: bool = Field(False, description="Answer with NDJSON: events, progress, then the result")
    callback_steps: int | None = Field(None, ge=1, le=1000, description="A progress event every N steps")

    _http_url = field_validator("send_url")(optional_http_url)
    _unicode = model_validator(mode="before")(valid_unicode)

    @field_validator("controlnet", mode="before")
    @classmethod
    def _one_control(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _one_control_type(self) -> GenerateRequest:
        if self.controlnet and len({control.type for control in self.controlnet}) > 1:
            raise ValueError("controlnet: give ControlNets or T2I-Adapters, not both in one request")
        return self

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
        given = _kwargs_scale(kwargs.pop("scale", None))
        for lora in self.lora_weights:
            if lora.scale is None:
                fragment = lora.fragment_scale
                lora.scale = given if given is not None else (fragment if fragment is not None else 1.0)
            if not -8 <= lora.scale <= 8:
                raise ValueError(f"the scale of LoRA {lora.url} is {lora.scale}; it must be between -8 and 8")
        self.cross_attention_kwargs = kwargs or None
        return self

    @model_validator(mode="after")
    def _lpw_pipeline(self) -> GenerateRequest:
        """`pipeline: "lpw_stable_diffusion"` (the original's community pipeline) is long prompts with A1111
        weighting on the model's own txt2img / img2img / inpaint pipeline, chosen as for no pipeline."""
        if self.pipeline == LPW_PIPELINE:
            self.pipeline = None
            self.long_prompts = True
            self.prompt_weighting = self.prompt_weighting or "a1111"
        return self

    @model_validator(mode="after")
    def _image_inputs_need_an_image(self) -> GenerateRequest:
        missing = [field for field in _NEEDS_IMAGE if getattr(self, field) is not None] if self.image is None else []
        if missing:  # a custom error: a ValueError's message would start with "Value error, "
            message = f"{missing[0]}: {_NEEDS_IMAGE[missing[0]]}, and this request has none"
            raise PydanticCustomError("needs_image", message)
        return self

    _upper_format = field_validator("image_format", mode="before")(upper_image_format)

    @field_validator("fill_mode", mode="before")
    @classmethod
    def _lower_fill_mode(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cross_attention_kwargs", mode="before")
    @classmethod
    def _parse_json_kwargs(cls, value: object) -> object:
        # The original accepted a JSON string here; keep accepting it.
        if isinstance(value, str):
            try:
                return loads_json(value, "the string")
            except InvalidInputs as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("extra", "cross_attention_kwargs")
    @classmethod
    def _finite_numbers(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """NaN and infinities are refused in the passed-through arguments as in the request's own fields
        (allow_inf_nan=False): `guidance_rescale: 1e999` there made a black image without an error."""
        pending: list[tuple[str, Any]] = list((value or {}).items())
        while pending:
            where, given = pending.pop()
            if isinstance(given, float) and not math.isfinite(given):
                raise PydanticCustomError("finite_number", f"{where} is {given}; numbers must be finite")
            if isinstance(given, dict):
                pending += [(f"{where}.{key}", item) for key, item in given.items()]
            elif isinstance(given, list):
                pending += [(f"{where}.{index}", item) for index, item in enumerate(given)]
        return value

    @field_validator("extra")
    @classmethod
    def _no_reserved_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_CALL_ARGS & value.keys())
        if reserved:
            raise ValueError(f"set by the server, not by a request: {', '.join(reserved)}")
        # A field's own checks (bounds, MAX_IMAGES, the pixel limit, the model's smallest size) must not be passed by
        # the same argument in `extra` ({"num_inference_steps": 10**9} there would run a billion steps, past the
        # field's bound of 1000).
        fields = sorted(cls.model_fields.keys() & value.keys())
        if fields:
            raise ValueError(f"{', '.join(fields)}: fields of the request; give them as such, not in extra")
        # diffusers reads its `*_kwargs` (SD3's and Flux's joint_attention_kwargs, PixArt's and others'
        # attention_kwargs) with .get() unchecked: a string there was an AttributeError, a 500.
        not_objects = sorted(
            name for name, given in value.items() if name.endswith("_kwargs") and not _is_object(given)
        )
        if not_objects:
            raise ValueError(f"{', '.join(not_objects)}: must be an object of keyword arguments (or null)")
        _check_sequence_length(value.get("max_sequence_length"))
        return value

    @property
    def image_count(self) -> int:
        prompts = len(self.prompt) if isinstance(self.prompt, list) else 1
        return prompts * self.num_images_per_prompt


# T5's longest prompt in tokens, as diffusers' SD3 and Flux pipelines bound `max_sequence_length`.
MAX_SEQUENCE_LENGTH = 512


def _check_sequence_length(length: object) -> None:
    """`max_sequence_length` (an `extra` argument of the T5 families) is a whole number from 1 to 512. PixArt checks
    none: its attention over 10**6 tokens asked for a terabyte; -1 was an OverflowError in the tokenizer (500s)."""
    if length is None:
        return
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length: {length!r} is not a whole number from 1 to {MAX_SEQUENCE_LENGTH}")


def _is_object(value: object) -> bool:
    return value is None or isinstance(value, dict)


def _kwargs_scale(given: object) -> float | None:
    """`cross_attention_kwargs.scale` as a number: float() of a list or an object was a TypeError, which pydantic
    does not report as a validation error (a 500)."""
    if given is None:
        return None
    try:
        if isinstance(given, bool) or not isinstance(given, int | float | str):
            raise TypeError
        return float(given)
    except (TypeError, ValueError):
        raise ValueError(f"cross_attention_kwargs.scale must be a number, not {given!r}") from None


def parse_request(data: Any) -> GenerateRequest:
    """Validate a native request, reporting every problem at once as INVALID_INPUTS."""
    return validate_inputs(GenerateRequest, data)


def validate_inputs(model: type[ModelT], data: Any) -> ModelT:
    """`model.model_validate(data)`, every problem at once as INVALID_INPUTS (`invalid_inputs`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_inputs(exc) from None


def invalid_inputs(exc: ValidationError) -> InvalidInputs:
    """A validation error as INVALID_INPUTS: every problem in the message, and each with its place."""
    return InvalidInputs(describe_validation_error(exc), errors=_error_list(exc))


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{prefix}{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def _error_list(exc: ValidationError) -> list[dict[str, str]]:
    return [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()]
