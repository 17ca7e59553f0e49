"""What a request returns: `GenerateResult` (the runner's, in process) and its native wire form
(`GenerateResponse`), and the native error body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)


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


class EncodedImage(BaseModel):
    data: str = Field(description="base64 of the encoded image")
    format: str


class ImageOut(EncodedImage):
    seed: int
    nsfw: bool | None = None


ImageT = TypeVar("ImageT", bound=EncodedImage)


class ImagesResponse(BaseModel, Generic[ImageT]):
    """The native answer's shape: the images (a kind of EncodedImage each), the request's meta, timings and
    memory use (`/v1/generate`, `/v1/upscale`)."""

    images: list[ImageT]
    meta: dict[str, Any]
    timings: dict[str, float]
    mem_usage: float


class GenerateResponse(ImagesResponse[ImageOut]):
    @classmethod
    def from_result(cls, result: GenerateResult) -> GenerateResponse:
        from ..imaging import to_base64

        nsfw: list[bool | None] = list(result.nsfw) if result.nsfw else [None] * len(result.images)
        images = [
            ImageOut(data=to_base64(data), format=result.image_format.lower(), seed=seed, nsfw=flag)
            for data, seed, flag in zip(result.images, result.seeds, nsfw, strict=True)
        ]
        return cls(images=images, meta=result.meta, timings=result.timings, mem_usage=result.mem_usage)


class ErrorBody(BaseModel):
    # each code may add fields of its own: requested, available, allowed, errors, limit, ...
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="What went wrong, for programs: INVALID_INPUTS, MODEL_MISMATCH, ...")
    name: str | None = Field(None, description="The exception behind it, as the original server named it")
    message: str = Field(description="What went wrong, for people; names the field at fault")
    stack: str | None = Field(None, description="The stack trace, with DEBUG only")


class ErrorResponse(BaseModel):
    error: ErrorBody
