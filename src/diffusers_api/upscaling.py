"""One upscale request, from its validated input to the upscaled image + meta + timings.

The runner hands `UpscaleRequest`s here, on the engine's thread, so upscales are admitted, queued and bounded
like generations (MAX_BATCH_SIZE, MAX_QUEUE): each holds one image's slot while it runs. The networks come from
models/upscalers.py (spandrel); a few stay loaded on the device, the most recently used first.

An image goes through the network whole, unless UPSCALE_TILE asks for tiles, or the whole image ran out of
memory: then it goes in tiles, as Real-ESRGAN's own `tile` option does it, of half the image's longer side,
halved again while a tile runs out of memory, down to MIN_TILE pixels. Each tile is run with a margin of
TILE_MARGIN pixels of its neighbours, which is cut off its output, so that the seams match the whole image's
pixels wherever the network sees no further than the margin.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING, Any

from . import imaging
from .devices import free_device_memory, is_out_of_memory, memory_usage, resolve_device
from .errors import InvalidInputs, PipelineError
from .limits import check_upscale_size
from .models.sources import phase
from .models.upscalers import load_upscaler, upscaler_file
from .schema import GenerateResult, UpscaleRequest

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .config import Settings

log = logging.getLogger(__name__)

KEPT_LOADED = 2  # upscalers held on the device; they are small (Real-ESRGAN x4plus: 67 MB in fp32)
TILE_MARGIN = 16  # input pixels of the neighbouring tiles each tile is run with (Real-ESRGAN's tile_pad is 10)
MIN_TILE = 32  # the smallest tile tried after running out of memory
FACE_ENHANCE_UNAVAILABLE = (
    "face_enhance: face restoration (GFPGAN) needs facexlib's face detection and basicsr, which need torchvision "
    "and OpenCV; this server does not include them. Upscale without face_enhance"
)


class Upscalers:
    """Runs upscale requests; keeps the last KEPT_LOADED networks loaded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()  # loads happen once, whichever thread asks first

    def run(self, request: UpscaleRequest, timings: dict[str, float]) -> GenerateResult:
        if request.face_enhance:
            raise InvalidInputs(FACE_ENHANCE_UNAVAILABLE, field="face_enhance")
        imaging.check_encodable(request.image_format)  # JXL without its plugin: refused before any work
        limits = {"max_bytes": self.settings.max_body_bytes, "max_pixels": self.settings.max_image_pixels}
        with phase(timings, "decode"):
            image = imaging.decode_image(request.image, "image", **limits)
        model = self._model(request.model, timings)
        scale = request.scale or float(model.scale)
        size = check_upscale_size(image.width, image.height, scale, self.settings.max_image_pixels)
        with phase(timings, "inference"):
            upscaled, tile = self._upscale(model, image, size)
        with phase(timings, "encode"):
            data = imaging.encode_image(upscaled, request.image_format, request.image_quality)
        device = str(model.device)
        meta = {
            "MODEL_ID": request.model,
            "PIPELINE": "upscale",
            "ARCHITECTURE": model.architecture.name,
            "scale": scale,
            "input_size": [image.width, image.height],
            "output_size": list(upscaled.size),
            "tile": tile,
            "image_format": request.image_format,
            "device": device,
        }
        if request.request_id:
            meta["startRequestId"] = request.request_id
        return GenerateResult(
            images=[data],
            image_format=request.image_format,
            seeds=[],
            nsfw=None,
            meta=meta,
            timings=dict(timings),
            mem_usage=memory_usage(device),
        )

    def _model(self, name: str, timings: dict[str, float]) -> Any:
        with self._lock:
            model = self._loaded.get(name)
            if model is not None:
                self._loaded.move_to_end(name)
                return model
            path = upscaler_file(name, self.settings, timings)  # reports its own `download` phase
            with phase(timings, "loadModel"):
                model = self._to_device(load_upscaler(path, name))
            self._loaded[name] = model
            while len(self._loaded) > KEPT_LOADED:
                self._loaded.popitem(last=False)
            return model

    def _to_device(self, model: Any) -> Any:
        device = resolve_device(self.settings.device)
        model = model.to(device)
        # Real-ESRGAN runs in fp16 on a GPU, as its own inference script does; fp32 elsewhere
        if device.startswith("cuda") and model.supports_half:
            model = model.half()
        return model

    def _upscale(self, model: Any, image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, int | None]:
        """The upscaled image, and the tile size it went through in (None: whole)."""
        import numpy as np
        import torch
        from PIL import Image

        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        batch = pixels.unsqueeze(0).to(model.device, model.dtype) / 255
        with torch.inference_mode():
            output, tile = _run(model, batch, self.settings.upscale_tile or None)
        array = (output[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        upscaled = Image.fromarray(array, "RGB")
        if upscaled.size != size:  # another scale than the network's own: resized as Real-ESRGAN's outscale does
            upscaled = upscaled.resize(size, Image.Resampling.LANCZOS)
        return upscaled, tile


def _run(model: Any, batch: torch.Tensor, tile: int | None) -> tuple[torch.Tensor, int | None]:
    """The network's output for `batch` (one image), whole (`tile` None) or in tiles of `tile` pixels; after
    running out of memory, in tiles of half the size tried (the image's longer side at first), down to MIN_TILE."""
    longest = int(max(batch.shape[-2:]))
    tile = None if tile is None or tile >= longest else tile
    while True:
        try:
            return (model(batch) if tile is None else _tiled(model, batch, tile)), tile
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failed = f"{type(exc).__name__}: {exc}"
        # Freed outside the except block, whose traceback holds the failed call's tensors.
        free_device_memory()
        tried = "the whole image" if tile is None else f"tiles of {tile} pixels"
        tile = (longest if tile is None else tile) // 2
        if tile < MIN_TILE:
            raise PipelineError(f"out of memory in {tried} ({failed}); try a smaller image")
        log.warning(
            "an upscale of %s ran out of memory in %s; trying tiles of %d", tuple(batch.shape[-2:]), tried, tile
        )


def _tiled(model: Any, batch: torch.Tensor, tile: int) -> torch.Tensor:
    """The network's output for `batch`, made tile by tile: each `tile`-sized square of the input is run with a
    margin of TILE_MARGIN pixels around it, and its output without the margin's is put in place."""
    height, width = batch.shape[-2:]
    scale = int(model.scale)
    output = batch.new_zeros((*batch.shape[:-2], height * scale, width * scale))
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(top - TILE_MARGIN, 0), max(left - TILE_MARGIN, 0)
            y1, x1 = min(bottom + TILE_MARGIN, height), min(right + TILE_MARGIN, width)
            piece = model(batch[..., y0:y1, x0:x1])
            dy, dx = (top - y0) * scale, (left - x0) * scale
            output[..., top * scale : bottom * scale, left * scale : right * scale] = piece[
                ..., dy : dy + (bottom - top) * scale, dx : dx + (right - left) * scale
            ]
    return output
