"""The named test requests of the original project's client (`txt2img`, `img2img`, `inpaint`, ...), with their
generated input images, and the `K=V` overrides of the command line."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping
from typing import Any

from .base import ClientError, Envelope


def _png_base64(width: int, height: int, draw: Callable[[Any], None]) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (40, 90, 160))
    draw(ImageDraw.Draw(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _scene(width: int, height: int) -> str:
    """A sky, a field and a sun: an input image made in code, so that no binary fixture is needed."""

    def draw(canvas: Any) -> None:
        canvas.rectangle((0, height * 2 // 3, width, height), fill=(60, 140, 50))
        canvas.ellipse((width // 8, height // 8, width // 3, height // 3), fill=(250, 210, 60))

    return _png_base64(width, height, draw)


def _mask(width: int, height: int) -> str:
    """Black, with a white square in the middle: the part an inpainting model repaints."""

    def draw(canvas: Any) -> None:
        canvas.rectangle((0, 0, width, height), fill=(0, 0, 0))
        canvas.rectangle((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(255, 255, 255))

    return _png_base64(width, height, draw)


_PROMPT = "realistic field of grass"
TESTS: dict[str, dict[str, Any]] = {
    "txt2img": {"modelInputs": {"prompt": _PROMPT}, "callInputs": {}},
    "txt2img-multiple": {"modelInputs": {"prompt": _PROMPT, "num_images_per_prompt": 2}, "callInputs": {}},
    "txt2img-euler-a": {"modelInputs": {"prompt": _PROMPT}, "callInputs": {"SCHEDULER": "Euler a"}},
    "txt2img-jpeg": {"modelInputs": {"prompt": _PROMPT}, "callInputs": {"image_format": "JPEG"}},
    "img2img": {
        "modelInputs": {"prompt": "a sunny meadow, oil painting", "strength": 0.75},
        "callInputs": {"PIPELINE": "img2img"},
    },
    "inpaint": {
        "modelInputs": {"prompt": "a red barn in a field"},
        "callInputs": {"PIPELINE": "inpaint"},
    },
}
_NEEDS_IMAGE = {"img2img", "inpaint"}
_NEEDS_MASK = {"inpaint"}


def build_test(
    name: str, model_args: Mapping[str, Any] | None = None, call_args: Mapping[str, Any] | None = None
) -> Envelope:
    """The legacy envelope of test `name` with the overrides laid over it. Input images are drawn at the
    requested width x height (512 x 512 by default), which then leave the request."""
    if name not in TESTS:
        raise ClientError(f"no test named {name!r}; known: {', '.join(TESTS)}")
    model_inputs = {**TESTS[name]["modelInputs"], **(model_args or {})}
    call_inputs = {**TESTS[name]["callInputs"], **(call_args or {})}
    if name in _NEEDS_IMAGE:
        # img2img and inpaint pipelines take their size from the input image, not from width / height
        width, height = int(model_inputs.pop("width", 512)), int(model_inputs.pop("height", 512))
        if "image" not in model_inputs:
            model_inputs["image"] = _scene(width, height)
        if name in _NEEDS_MASK and "mask_image" not in model_inputs:
            model_inputs["mask_image"] = _mask(width, height)
    return {"modelInputs": model_inputs, "callInputs": call_inputs}


def coerce(value: str) -> bool | int | float | str:
    """A command-line value as the type it looks like: true/false, an int, a float, else the string."""
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def parse_pairs(pairs: list[str] | None) -> dict[str, Any]:
    """`["K=V", ...]` -> `{K: coerce(V)}`; a pair without `=` is a ClientError naming it."""
    parsed: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"expected KEY=VALUE, got {pair!r}")
        parsed[key] = coerce(value)
    return parsed
