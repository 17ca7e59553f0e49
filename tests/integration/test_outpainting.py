"""Outpainting (FILL_MODE / fill_mode) on the built-in tiny inpainting model: the transparent area of the image is
pre-filled and becomes the mask, and the pipeline runs on exactly what fill.py made."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.errors import InvalidInputs
from diffusers_api.fill import prefill
from diffusers_api.imaging import encode_image, to_base64
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, from_legacy

SIZE = 32


@pytest.fixture(scope="module")
def runner(models_dir: Path) -> Runner:
    runner = Runner(Settings(model_id="builtin/tiny-sd-inpaint", models_dir=models_dir))
    runner.start()
    return runner


def ask(**fields: object) -> GenerateRequest:
    defaults = {"prompt": "a beach", "num_inference_steps": 2, "seed": 3, "width": SIZE, "height": SIZE}
    return GenerateRequest(**(defaults | fields))


def half_transparent() -> Image.Image:
    """Stripes on the left half, nothing (alpha 0) on the right: the picture to extend."""
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    for x in range(0, SIZE // 2, 4):
        image.paste((220, 120, 40, 255), (x, 0, x + 2, SIZE))
        image.paste((40, 90, 200, 255), (x + 2, 0, x + 4, SIZE))
    return image


def png(image: Image.Image) -> str:
    return to_base64(encode_image(image))


def test_the_transparent_area_is_filled_and_is_the_mask(runner: Runner) -> None:
    # strength < 1: the denoising starts from the (filled) image, so what fills the area shows
    outpainted = runner.run(ask(image=png(half_transparent()), fill_mode="edge", strength=0.6))

    assert outpainted.meta["PIPELINE"] == "StableDiffusionInpaintPipeline"
    assert outpainted.meta["FILL_MODE"] == "edge"
    assert "fill" in outpainted.timings
    # the same request made by hand, from fill.py's image and mask, gives the same bytes ...
    filled, mask = prefill(half_transparent(), None, "edge")
    by_hand = runner.run(ask(image=png(filled), mask_image=png(mask), strength=0.6))
    assert outpainted.images == by_hand.images
    # ... and differs from inpainting the image as it decodes without a fill (transparency on white)
    unfilled = runner.run(ask(image=png(half_transparent()), mask_image=png(mask), strength=0.6))
    assert "FILL_MODE" not in unfilled.meta
    assert unfilled.images != outpainted.images


def test_legacy_fill_mode_patchmatch(runner: Runner) -> None:
    envelope = {
        "modelInputs": {
            "prompt": "a beach",
            "num_inference_steps": 2,
            "seed": 3,
            "width": SIZE,
            "height": SIZE,
            "init_image": png(half_transparent()),
        },
        "callInputs": {"FILL_MODE": "patchmatch"},
    }
    result = runner.run(from_legacy(envelope))
    assert result.meta["FILL_MODE"] == "patchmatch"
    assert Image.open(io.BytesIO(result.images[0])).size == (SIZE, SIZE)


def test_the_server_fill_mode_applies_to_inpainting_requests_only(runner: Runner) -> None:
    served = Runner(Settings(model_id="builtin/tiny-sd-inpaint", fill_mode="edge"), store=runner.store)
    inpainted = served.run(ask(image=png(half_transparent()), pipeline="inpaint"))  # no mask: the transparent area
    assert inpainted.meta["FILL_MODE"] == "edge"
    plain = served.run(
        ask(
            image=png(half_transparent()),
            fill_mode="none",
            mask_image=png(prefill(half_transparent(), None, "edge")[1]),
        )
    )
    assert "FILL_MODE" not in plain.meta


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"image": png(Image.new("RGBA", (SIZE, SIZE), (9, 9, 9, 255)))}, "no transparent area and the request no"),
        ({"image": png(half_transparent()), "pipeline": "img2img"}, "pre-fills for inpainting, and .*Img2Img"),
        ({"image": png(Image.new("RGBA", (SIZE, SIZE)))}, "whole image is to be filled"),
    ],
    ids=["opaque-without-mask", "not-inpainting", "all-transparent"],
)
def test_fill_mode_errors_name_the_problem(runner: Runner, fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInputs, match=fragment) as caught:
        runner.run(ask(fill_mode="edge", **fields))
    assert caught.value.extra["field"] == "fill_mode"


def test_inpainting_without_mask_or_fill_mode_still_needs_a_mask(runner: Runner) -> None:
    with pytest.raises(InvalidInputs, match=r"mask_image: required by .* \(or a fill_mode"):
        runner.run(ask(image=png(half_transparent()), pipeline="inpaint"))
