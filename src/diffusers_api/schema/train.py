"""The training request (`POST /v1/train`, legacy `callInputs.train: "dreambooth"`) and what a training returns.

Argument names are those of docker-diffusers-api's train_dreambooth.py (itself diffusers' DreamBooth example):
`instance_images`, `instance_prompt`, `max_train_steps`, `learning_rate`, ... Those of the original that only
concerned its own machinery (output_dir, logging_dir, report_to, 8-bit Adam, xformers, ...) are accepted and
ignored, so that its clients' requests still run; any other name is refused with the list of known ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ..errors import InvalidInputs
from .request import (
    _HTTP_PATTERN,
    NAME_PATTERN,
    TRAINED_PREFIX,
    VARIANT_PATTERN,
    _require_http,
    is_trained_name,
    valid_unicode,
    validate_inputs,
)

__all__ = ["TRAINED_PREFIX", "TrainRequest", "TrainResult", "is_trained_name", "parse_train_request"]

TrainMode = Literal["lora", "full"]
DEST_SCHEMES = ("s3", "http+s3", "https+s3")

# The original's arguments that concerned its own machinery: accepted (its clients send them) and ignored.
IGNORED_ARGS = frozenset(
    {
        "pretrained_model_name_or_path",
        "tokenizer_name",
        "instance_data_dir",
        "class_data_dir",
        "output_dir",
        "logging_dir",
        "report_to",
        "local_rank",
        "hub_token",
        "dataloader_num_workers",
        "checkpointing_steps",
        "use_8bit_adam",
        "enable_xformers_memory_efficient_attention",
        "allow_tf32",
        "set_grads_to_none",
        "prior_generation_precision",
    }
)
# Arguments of the original this server does not implement: refused when they ask for what it cannot do.
_UNSUPPORTED = {
    "push_to_hub": "pushing to the Hugging Face hub is not supported; give dest_url (s3://) or name",
    "resume_from_checkpoint": "resuming from a checkpoint is not supported",
}


class TrainRequest(BaseModel):
    """DreamBooth training of the served model (SD 1.x/2.x or SDXL): a LoRA of the UNet's attention (default) or the
    whole UNet (`train_mode: "full"`)."""

    # No example in the schema: /docs would offer one that runs (tests/integration/test_openapi_examples.py), and
    # a training needs real images and somewhere to put its result. The README has one.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    _unicode = model_validator(mode="before")(valid_unicode)

    train: Literal["dreambooth"] = Field("dreambooth", description="The method (the legacy callInputs.train)")
    train_mode: TrainMode = Field("lora", description="lora: a LoRA of the UNet's attention; full: the whole UNet")

    # --- what is trained -------------------------------------------------------------------------------------
    model: str | None = Field(None, description="Model id (MODEL_ID); defaults to the served model")
    hf_model_id: str | None = Field(None, description="Hub repository when `model` is only an alias")
    revision: str | None = Field(None, description="MODEL_REVISION")
    variant: str | None = Field(None, pattern=VARIANT_PATTERN, description="MODEL_VARIANT")
    precision: Literal["", "fp16", "bf16", "fp32"] | None = Field(None, description="MODEL_PRECISION")
    model_url: str | None = Field(None, description="MODEL_URL: cloud-cache archive of the model trained")
    checkpoint_url: str | None = Field(None, description="CHECKPOINT_URL of the model trained")
    checkpoint_config_url: str | None = Field(None, description="CHECKPOINT_CONFIG_URL: its checkpoint's .yaml")

    # --- data ------------------------------------------------------------------------------------------------
    instance_images: list[str] = Field(
        min_length=1, max_length=200, description="Images of the subject: base64 or data URIs"
    )
    instance_prompt: str = Field(min_length=1, max_length=2000, description="The prompt that names the subject")
    resolution: int | None = Field(
        None, ge=8, le=2048, multiple_of=8, description="Training size in pixels; default: the model's own"
    )
    center_crop: bool = Field(False, description="Crop the images' centres (else random crops)")

    # --- optimisation ----------------------------------------------------------------------------------------
    max_train_steps: int = Field(400, ge=1, le=100_000, description="Optimizer steps")
    num_train_epochs: int | None = Field(None, ge=1, description="Ignored: max_train_steps decides")
    train_batch_size: int = Field(1, ge=1, le=64)
    gradient_accumulation_steps: int = Field(1, ge=1, le=128)
    gradient_checkpointing: bool = Field(False, description="Less memory, about 20% slower")
    learning_rate: float | None = Field(None, gt=0, le=1, description="Default: 1e-4 for a LoRA, 5e-6 for full")
    scale_lr: bool = Field(False, description="Multiply the rate by batch size x accumulation steps")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: int = Field(1, ge=1)
    lr_power: float = Field(1.0, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="Autocast on CUDA (default fp16 there); a CPU trains in fp32"
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seeds noise, timesteps and the LoRA's start")
    rank: int = Field(4, ge=1, le=256, description="The LoRA's rank (train_mode lora)")

    # --- prior preservation ----------------------------------------------------------------------------------
    with_prior_preservation: bool = Field(
        False, description="Also train on images of the subject's class, so that the model keeps what the class is"
    )
    class_prompt: str | None = Field(
        None, min_length=1, max_length=2000, description="The class, e.g. 'a photo of a dog' (prior preservation)"
    )
    class_images: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="Images of the class (base64 or data URIs); those missing up to num_class_images are generated"
        " from class_prompt by the model itself",
    )
    num_class_images: int | None = Field(
        None, ge=1, le=1000, description="Class images to train with (default 100, or as many as class_images has)"
    )
    sample_batch_size: int = Field(4, ge=1, le=64, description="Class images generated per pipeline call")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class images' loss")
    train_text_encoder: bool = Field(
        False, description="Also train the text encoder (a LoRA of its attention, or whole with train_mode full)"
    )
    push_to_hub: bool = False
    hub_model_id: str | None = Field(None, description="Ignored (push_to_hub is not supported)")
    resume_from_checkpoint: str | None = None

    # --- where the result goes -------------------------------------------------------------------------------
    dest_url: str | None = Field(
        None,
        max_length=2000,
        description="s3:// URL (the MODEL_URL forms) to upload to: a LoRA as one .safetensors, a full fine-tune as "
        "a .tar.zst of the model directory; a key that is empty or ends with / gets <name>.safetensors or "
        "models--trained--<name>.tar.zst",
    )
    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Keep the result in MODELS_DIR under this new name: then `trained/<name>` is a model (full) or "
        "a lora_weights entry (LoRA)",
    )

    # --- bookkeeping and events ------------------------------------------------------------------------------
    request_id: str | None = Field(None, max_length=200, description="Echoed in events (legacy startRequestId)")
    send_url: str | None = Field(
        None, max_length=2000, description="Webhook for this training's events", json_schema_extra=_HTTP_PATTERN
    )
    sign_key: SecretStr | None = Field(None, description="HMAC-SHA256 key for this training's webhooks")
    callback_steps: int | None = Field(None, ge=1, description="A progress event every N steps")

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in IGNORED_ARGS}
        return data

    @field_validator("send_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return _require_http(value) if value else None

    @field_validator("dest_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme not in DEST_SCHEMES:
            raise ValueError("must be an s3://, http+s3:// or https+s3:// URL (results are uploaded to S3)")
        return value

    @model_validator(mode="after")
    def _supported(self) -> TrainRequest:
        asked = [name for name in _UNSUPPORTED if getattr(self, name)]
        if asked:
            raise ValueError("; ".join(f"{name}: {_UNSUPPORTED[name]}" for name in asked))
        if self.dest_url is None and self.name is None:
            raise ValueError("give dest_url (an s3:// URL to upload the result to), name (to keep it here), or both")
        if self.with_prior_preservation and self.class_prompt is None:
            raise ValueError("class_prompt: required with with_prior_preservation (the class the subject belongs to)")
        return self

    @property
    def class_image_count(self) -> int:
        """How many class images the training uses (0 without prior preservation)."""
        if not self.with_prior_preservation:
            return 0
        return self.num_class_images or max(len(self.class_images), 100)

    @property
    def effective_learning_rate(self) -> float:
        rate = self.learning_rate or (1e-4 if self.train_mode == "lora" else 5e-6)
        return rate * self.train_batch_size * self.gradient_accumulation_steps if self.scale_lr else rate

    @property
    def trained_id(self) -> str | None:
        """`trained/<name>`: how requests then name the result."""
        return f"{TRAINED_PREFIX}{self.name}" if self.name else None

    def model_request(self) -> dict[str, Any]:
        """The fields that name the model trained, as a GenerateRequest takes them."""
        names = ("model", "hf_model_id", "revision", "variant", "precision", "model_url", *CHECKPOINT_FIELDS)
        return {name: getattr(self, name) for name in names}


CHECKPOINT_FIELDS = ("checkpoint_url", "checkpoint_config_url")


def known_args() -> list[str]:
    return sorted(set(TrainRequest.model_fields) | IGNORED_ARGS)


def parse_train_request(data: Any) -> TrainRequest:
    """Validate a training request, every problem at once as INVALID_INPUTS; an unknown argument is named with
    the list of known ones."""
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(known_args()))
        if unknown:
            raise InvalidInputs(
                f"unknown training arguments: {', '.join(unknown)}", unknown=unknown, known=known_args()
            )
    return validate_inputs(TrainRequest, data)


class TrainResult(BaseModel):
    """What a training made and where it went."""

    train_mode: TrainMode
    steps: int = Field(description="Optimizer steps done")
    loss: float = Field(description="Mean loss of the last step")
    model: str | None = Field(None, description="`trained/<name>` of a full fine-tune kept here: a model id")
    lora_weights: str | None = Field(None, description="`trained/<name>` of a LoRA kept here: a lora_weights entry")
    dest_url: str | None = Field(None, description="Where it was uploaded")
    bytes: int = Field(description="Size of the .safetensors (LoRA) or of the .tar.zst (full) uploaded or kept")
    meta: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
