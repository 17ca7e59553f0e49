"""`controlnet`: ControlNets and T2I-Adapters that steer a request by a conditioning image (edges, depth, pose...).

Each entry names its model (a hub id, a local directory, `builtin/...`, or the URL of a cloud-cache archive), the
conditioning image, and how strongly and over which part of the schedule it acts. The models are loaded and kept
by the model store (models/controls.py); the runner runs the request with diffusers' ControlNet / T2I-Adapter
pipeline over the served model's components.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CONTROLS = 4

ControlType = Literal["controlnet", "t2i"]
_ARCHIVE_SCHEMES = ("s3://", "http://", "https://", "http+s3://", "https+s3://")


class ControlInput(BaseModel):
    """One ControlNet (or T2I-Adapter) and its conditioning image."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        description="The control model: a hub id (e.g. lllyasviel/sd-controlnet-canny), a local directory, or "
        "builtin/tiny-controlnet, builtin/tiny-controlnet-sdxl, builtin/tiny-t2i-adapter",
    )
    url: str | None = Field(
        None,
        max_length=2000,
        description="Instead of `model`: a cloud-cache archive of the model (s3://, http(s)://, as MODEL_URL)",
    )
    image: str = Field(description="The conditioning image (base64, data URI or http(s) URL)")
    scale: float = Field(1.0, ge=0, le=10, description="Its weight (controlnet_conditioning_scale)")
    start: float = Field(0.0, ge=0, le=1, description="Fraction of the steps where it starts acting")
    end: float = Field(1.0, ge=0, le=1, description="Fraction of the steps where it stops acting")
    type: ControlType = Field("controlnet", description="controlnet, or t2i (a T2I-Adapter)")

    @model_validator(mode="after")
    def _check(self) -> ControlInput:
        if (self.model is None) == (self.url is None):
            raise ValueError("give either `model` or `url` (and not both)")
        if self.url is not None and not self.url.startswith(_ARCHIVE_SCHEMES):
            raise ValueError("`url` must be an s3:// or http(s):// archive URL")
        if self.start >= self.end:
            raise ValueError(f"start ({self.start:g}) must be less than end ({self.end:g})")
        if self.type == "t2i" and self.start != 0.0:
            raise ValueError("a T2I-Adapter acts from the first step: `start` must be 0 (`end` bounds it)")
        return self

    @property
    def source(self) -> str:
        """What names the model: its id, or its archive's URL."""
        return self.model if self.model is not None else str(self.url)


def controls_schema(schema: dict[str, Any]) -> None:
    """`controlnet` may also be one object, not in a list."""
    listed, null = schema["anyOf"]
    schema["anyOf"] = [listed, listed["items"], null]


__all__ = ["MAX_CONTROLS", "ControlInput", "ControlType", "controls_schema"]
