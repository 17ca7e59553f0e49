"""Outpainting pre-fill (FILL_MODE, a request's `fill_mode`): before inpainting, the area to repaint is filled
with plausible content, so that the model starts from colours and texture that continue the image rather than
from what lay under the transparency.

As docker-diffusers-api did for FILL_MODE=patchmatch, the area is the image's transparent part (any alpha below
255) and, when the request gives no `mask_image`, that area (grown to the 8-pixel cells of the latents) becomes
the mask. An image without transparency is filled where its `mask_image` is white. Modes:

    patchmatch  PatchMatch (the maintained `pypatchmatch` package, whose native library loads at first use)
    edge        each pixel takes the colour of the nearest known pixel (numpy and scipy only: no native library)
    none        no pre-fill
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .errors import InvalidInputs

if TYPE_CHECKING:
    from PIL import Image

FILL_MODES = ("none", "patchmatch", "edge")
# The latents' cell: a mask made from the transparent area covers whole cells, as the original's did.
CELL = 8
_PATCH_SIZE = 3  # as the original called PatchMatch
# pypatchmatch's random seed is global to its native library: one fill at a time keeps results reproducible.
_PATCHMATCH_LOCK = threading.Lock()


def prefill(image: Image.Image, mask: Image.Image | None, mode: str) -> tuple[Image.Image, Image.Image]:
    """Fill `image` (RGBA) where it is transparent, or else where `mask` is white, with `mode`. Returns the RGB
    image and the mask to inpaint with: `mask` when given, else the transparent area grown to whole cells."""
    import numpy as np
    from PIL import Image

    rgba = np.asarray(image.convert("RGBA"))
    hole = rgba[..., 3] < 255
    if not hole.any():
        if mask is None:
            raise InvalidInputs(
                f"fill_mode {mode}: the image has no transparent area and the request no mask_image, so there is "
                "nothing to fill",
                field="fill_mode",
            )
        hole = np.asarray(mask.convert("L").resize(image.size, Image.Resampling.NEAREST)) >= 128
    if hole.all():
        raise InvalidInputs(
            f"fill_mode {mode}: the whole image is to be filled, which leaves nothing to fill it from",
            field="fill_mode",
        )
    filled = _FILLERS[mode](np.ascontiguousarray(rgba[..., :3]), hole)
    if mask is None:
        mask = Image.fromarray(_whole_cells(hole))
    return Image.fromarray(filled), mask


def _patchmatch(rgb: Any, hole: Any) -> Any:
    patch_match = _patchmatch_module()
    import numpy as np

    with _PATCHMATCH_LOCK:
        patch_match.set_random_seed(0)
        return patch_match.inpaint(rgb, mask=hole.astype(np.uint8) * 255, patch_size=_PATCH_SIZE)


def _patchmatch_module() -> Any:
    try:
        from patchmatch import patch_match
    except (ImportError, OSError) as exc:
        raise _unavailable(f"{type(exc).__name__}: {exc}") from None
    if not patch_match.patchmatch_available:
        raise _unavailable("its native library did not load")
    return patch_match


def _unavailable(why: str) -> InvalidInputs:
    return InvalidInputs(
        f"fill_mode patchmatch: PatchMatch is not available on this server ({why}; pip install pypatchmatch); "
        "fill_mode edge needs no native library",
        field="fill_mode",
    )


def _edge(rgb: Any, hole: Any) -> Any:
    """Each hole pixel takes the colour of the nearest pixel outside the hole (Euclidean distance)."""
    from scipy import ndimage

    nearest = ndimage.distance_transform_edt(hole, return_distances=False, return_indices=True)
    return rgb[tuple(nearest)]


def _whole_cells(hole: Any) -> Any:
    """The hole as a white-on-black "L" mask, grown to whole CELL x CELL cells (the original's block_reduce)."""
    import numpy as np

    height, width = hole.shape
    padded = np.pad(hole, ((0, -height % CELL), (0, -width % CELL)))
    cells = padded.reshape(padded.shape[0] // CELL, CELL, padded.shape[1] // CELL, CELL).any(axis=(1, 3))
    grown = cells.repeat(CELL, axis=0).repeat(CELL, axis=1)[:height, :width]
    return grown.astype(np.uint8) * 255


_FILLERS = {"patchmatch": _patchmatch, "edge": _edge}
