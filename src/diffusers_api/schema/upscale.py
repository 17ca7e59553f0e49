"""Upscaling: `UpscaleRequest` (`POST /v1/upscale`, and the legacy `use_extra: "upsample"`) and its native answer.

An upscaler is a super-resolution network (Real-ESRGAN and the like) named by `model`: one of UPSCALER_URLS, or
`builtin/tiny-upscaler`. It runs on the engine like a generation, so the request carries the same bookkeeping
fields (request id, webhook, NDJSON streaming) and answers in the same shape as `/v1/generate`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .request import _HTTP_PATTERN, ImageFormat, optional_http_url, upper_image_format, valid_unicode, validate_inputs
from .response import EncodedImage, GenerateResult, ImagesResponse

DEFAULT_UPSCALER = "RealESRGAN_x4plus"
# A tiny 8x8 PNG, so that the examples run as they are (tests/integration/test_openapi_examples.py runs them).
_EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAGUlEQVR4nGNkYGhQYGDARCwMCgxYweCUAABobwJe4J3LcgAAAABJRU5ErkJggg=="
)


class UpscaleRequest(BaseModel):
    """Upscale one image with a super-resolution model."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [{"image": _EXAMPLE_IMAGE, "model": "builtin/tiny-upscaler"}],
        },
    )

    _unicode = model_validator(mode="before")(valid_unicode)

    image: str = Field(min_length=1, description="The image to upscale: base64 or a data URI")
    model: str = Field(
        DEFAULT_UPSCALER,
        min_length=1,
        max_length=200,
        description="Upscaler name: one of UPSCALER_URLS (RealESRGAN_x4plus, RealESRGAN_x4plus_anime_6B,"
        " realesr-general-x4v3 by default) or builtin/tiny-upscaler",
    )
    scale: float | None = Field(
        None,
        ge=1,
        le=8,
        description="Output size / input size; default: the model's own (4 for Real-ESRGAN x4). Another scale"
        " resizes the model's output (Lanczos), as Real-ESRGAN's `outscale` does",
    )
    face_enhance: bool = Field(False, description="Restore faces with GFPGAN: not available on this server")

    # --- output and bookkeeping, as in GenerateRequest ---------------------------------------------------------
    image_format: ImageFormat = "PNG"
    image_quality: int | None = Field(None, ge=1, le=100, description="JPEG / WEBP quality")
    request_id: str | None = Field(None, max_length=200, description="Echoed in meta (legacy startRequestId)")
    send_url: str | None = Field(
        None, max_length=2000, description="Webhook for this request's events", json_schema_extra=_HTTP_PATTERN
    )
    sign_key: SecretStr | None = Field(None, description="HMAC-SHA256 key for this request's webhooks (SIGN_KEY)")
    stream_events: bool = Field(False, description="Answer with NDJSON: events, then the result")

    _http_url = field_validator("send_url")(optional_http_url)
    _upper_format = field_validator("image_format", mode="before")(upper_image_format)

    @property
    def image_count(self) -> int:
        """What it holds of the engine's batch (MAX_BATCH_SIZE): one image."""
        return 1

    @property
    def callback_steps(self) -> None:
        """An upscale has no steps to report progress on."""
        return None


def parse_upscale_request(data: Any) -> UpscaleRequest:
    """Validate an upscale request, reporting every problem at once as INVALID_INPUTS."""
    return validate_inputs(UpscaleRequest, data)


class UpscaledImage(EncodedImage):
    width: int
    height: int


class UpscaleResponse(ImagesResponse[UpscaledImage]):
    @classmethod
    def from_result(cls, result: GenerateResult) -> UpscaleResponse:
        from ..imaging import to_base64

        width, height = result.meta["output_size"]
        images = [
            UpscaledImage(data=to_base64(data), format=result.image_format.lower(), width=width, height=height)
            for data in result.images
        ]
        return cls(images=images, meta=result.meta, timings=result.timings, mem_usage=result.mem_usage)
