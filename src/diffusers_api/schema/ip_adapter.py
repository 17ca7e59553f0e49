"""The `ip_adapter` input: an IP-Adapter, the image prompt it encodes, and the scale it is weighed by.

Names follow diffusers' `load_ip_adapter` (`subfolder`, `weight_name`, `image_encoder_folder`) and
`set_ip_adapter_scale`; the images become the pipeline's `ip_adapter_image`.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_IP_ADAPTER_IMAGES = 4
_IMAGE = "base64, data URI or http(s) URL"


class IPAdapter(BaseModel):
    """An image prompt: the IP-Adapter that reads it, the image(s), and their weight."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "model": "h94/IP-Adapter",
                    "subfolder": "models",
                    "weight_name": "ip-adapter_sd15.safetensors",
                    "image": "https://example.com/style.png",
                    "scale": 0.6,
                }
            ]
        },
    )

    model: str = Field(
        min_length=1,
        max_length=500,
        description="Hub repository, local directory (in MODELS_DIR or LOCAL_MODEL_ROOTS), or builtin/tiny-ip-adapter"
        " / builtin/tiny-ip-adapter-sdxl",
    )
    url: str | None = Field(
        None,
        max_length=2000,
        description="Cloud-cache archive of the adapter (as MODEL_URL: s3://, http+s3://, http(s)://): downloaded"
        " when there, else (s3) built from `model` and uploaded",
    )
    subfolder: str = Field("", max_length=200, description="Folder of the weight file in it (h94/IP-Adapter: models)")
    weight_name: str | None = Field(
        None,
        max_length=200,
        pattern=r"\.safetensors$",
        description="The .safetensors weight file; default: the only one in `subfolder` (required for a hub repo)",
    )
    image_encoder_folder: str = Field(
        "image_encoder",
        min_length=1,
        max_length=200,
        description="The CLIP image encoder's folder: inside `subfolder` unless it holds a '/'",
    )
    image: str | Annotated[list[str], Field(min_length=1, max_length=MAX_IP_ADAPTER_IMAGES)] = Field(
        description=f"The image prompt ({_IMAGE}), or a list of up to {MAX_IP_ADAPTER_IMAGES} of them"
    )
    scale: float = Field(1.0, ge=0, le=2, description="Weight of the image prompt; 0 leaves it out")

    @field_validator("subfolder", "image_encoder_folder")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError("must be a folder inside the adapter's repository or directory")
        return value

    @property
    def images(self) -> list[str]:
        return [self.image] if isinstance(self.image, str) else list(self.image)
