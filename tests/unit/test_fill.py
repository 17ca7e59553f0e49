"""The outpainting pre-fill (fill.py): what is filled, with what, and the mask it makes."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pytest
from PIL import Image

from diffusers_api import fill
from diffusers_api.errors import InvalidInputs
from diffusers_api.fill import prefill

RED, BLUE = (200, 30, 30, 255), (30, 30, 200, 255)


def left_red_right_clear(width: int = 40, height: int = 24, clear_from: int = 20) -> Image.Image:
    """Red, with a blue block at the top of the edge, fully transparent from column `clear_from` on."""
    image = Image.new("RGBA", (width, height), RED)
    image.paste(BLUE, (clear_from - 6, 0, clear_from, 6))
    image.paste((0, 0, 0, 0), (clear_from, 0, width, height))
    return image


@pytest.mark.parametrize("mode", ["edge", "patchmatch"])
def test_the_transparent_area_is_filled_from_the_image_and_becomes_the_mask(mode: str) -> None:
    filled, mask = prefill(left_red_right_clear(), None, mode)

    pixels = np.asarray(filled)
    assert filled.mode == "RGB"
    assert filled.size == (40, 24)
    assert (pixels[:, :20] == np.asarray(left_red_right_clear().convert("RGB"))[:, :20]).all()  # untouched
    hole = pixels[:, 20:].reshape(-1, 3).astype(int)
    # colours taken from the image (PatchMatch blends the patches it copies): red and blue, never the black under
    # the transparency or white; mostly red, as the image is
    assert (hole[:, 1] == 30).all()
    assert (hole.sum(axis=1) > 200).all()
    assert 100 < hole[:, 0].mean() <= 200
    assert hole[:, 2].mean() < 120
    # the mask: the transparent columns 20..39, grown to whole 8x8 cells (16..39), white on black
    cells = np.asarray(mask)
    assert mask.mode == "L"
    assert (cells[:, 16:] == 255).all()
    assert (cells[:, :16] == 0).all()


def test_edge_fill_takes_the_nearest_known_pixel() -> None:
    filled, _ = prefill(left_red_right_clear(), None, "edge")
    assert filled.getpixel((39, 2)) == BLUE[:3]  # rows 0..5 end in blue
    assert filled.getpixel((39, 20)) == RED[:3]


def test_partial_transparency_counts_as_transparent() -> None:
    image = Image.new("RGBA", (16, 16), RED)
    image.paste((0, 200, 0, 254), (8, 0, 16, 16))
    filled, mask = prefill(image, None, "edge")
    assert filled.getpixel((12, 12)) == RED[:3]
    assert np.asarray(mask)[:, 8:].min() == 255


def test_a_given_mask_is_kept_and_fills_an_opaque_image_where_it_is_white() -> None:
    image = Image.new("RGBA", (40, 24), RED)  # opaque
    image.paste((255, 255, 255, 255), (30, 0, 40, 24))  # a white patch the mask marks
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (28, 0, 40, 24))

    filled, kept = prefill(image, mask, "edge")

    assert kept is mask
    assert filled.getpixel((35, 12)) == RED[:3]
    assert filled.getpixel((10, 12)) == RED[:3]


def test_a_given_mask_is_kept_when_the_image_is_transparent() -> None:
    mask = Image.new("L", (40, 24), 255)
    filled, kept = prefill(left_red_right_clear(), mask, "edge")
    assert kept is mask
    assert filled.getpixel((30, 12)) == RED[:3]


@pytest.mark.parametrize(
    ("image", "mask", "fragment"),
    [
        (Image.new("RGBA", (16, 16), RED), None, "no transparent area and the request no mask_image"),
        (Image.new("RGBA", (16, 16), (0, 0, 0, 0)), None, "whole image is to be filled"),
        (Image.new("RGBA", (16, 16), RED), Image.new("L", (16, 16), 255), "whole image is to be filled"),
    ],
    ids=["opaque-no-mask", "all-transparent", "all-masked"],
)
def test_nothing_to_fill_or_nothing_to_fill_from_is_invalid(image: Image.Image, mask: Any, fragment: str) -> None:
    with pytest.raises(InvalidInputs, match=fragment) as caught:
        prefill(image, mask, "edge")
    assert caught.value.extra["field"] == "fill_mode"


def test_patchmatch_is_reproducible() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 4), dtype=np.uint8))
    image.putalpha(Image.new("L", (32, 32), 255))
    image.paste((0, 0, 0, 0), (16, 0, 32, 32))
    first, _ = prefill(image, None, "patchmatch")
    second, _ = prefill(image, None, "patchmatch")
    assert first.tobytes() == second.tobytes()


def test_without_pypatchmatch_patchmatch_is_a_clear_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_patchmatch(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("patchmatch"):
            raise ImportError("No module named 'patchmatch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_patchmatch)
    with pytest.raises(InvalidInputs, match=r"PatchMatch is not available on this server .*fill_mode edge"):
        prefill(left_red_right_clear(), None, "patchmatch")
    assert fill.prefill(left_red_right_clear(), None, "edge")[0].size == (40, 24)  # edge needs no native library
