"""LoRA weights a request names (`lora_weights`): fetched once, fused into copies of the model's modules.

A LoRA changes the weights a UNet step uses, and requests share their UNet steps. Loading an adapter into the
shared UNet would change every request in flight, so a model with LoRAs applied is a *variant* of it: the
modules the LoRAs touch (UNet, text encoders) are copied, the LoRAs are loaded into the copies with diffusers'
own loader, fused at their scales, and the adapter layers removed again, so that the variant runs as fast as the
plain model (and its steps can be CUDA graphs or compiled like any UNet's). Everything else (VAE, tokenizers,
scheduler config) stays shared. Requests with the same LoRAs and scales share the variant and batch together;
the store keeps a few variants per model (LORA_VARIANTS_KEPT) and drops them with it.

Files come from http(s) URLs only: checked like any URL a request brings (no private addresses unless
ALLOW_PRIVATE_URLS), capped at LORA_MAX_BYTES, read as safetensors (never pickle), and kept in
MODELS_DIR/loras under a name derived from the URL, written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputs, ModelNotFound
from . import disk, transfer

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

LORA_DIR = "loras"
# The modules a LoRA may touch; each is copied for a variant only if the LoRAs do touch it.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def lora_path(url: str, models_dir: Path) -> Path:
    """Where the file of `url` is kept."""
    return models_dir / LORA_DIR / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.safetensors"


def fetch_lora(url: str, settings: Settings, timings: dict[str, float] | None = None) -> Path:
    """The local file of the LoRA at `url`, downloaded on first use."""
    from .sources import phase

    path = lora_path(url, settings.models_dir)
    if path.is_file():
        return path
    if settings.offline:
        raise ModelNotFound(f"LoRA {url} is not in {path.parent} and OFFLINE=1 forbids downloading it", requested=url)
    with phase(timings, "download"), disk.temporary_file(settings.models_dir, path.name) as part:
        try:
            transfer.http_download(url, part, settings, max_bytes=settings.lora_max_bytes)
        except transfer.Missing:
            raise InvalidInputs(f"LoRA {url} was not found (HTTP 404)", field="lora_weights") from None
        _check_safetensors(part, url)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, path)  # complete: published under its final name in one step
    return path


def _check_safetensors(path: Path, url: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            if not list(weights.keys()):
                raise InvalidInputs(f"LoRA {url} holds no tensors", field="lora_weights")
    except InvalidInputs:
        raise
    except Exception as exc:  # safetensors raises its own error types for every malformed file
        raise InvalidInputs(
            f"LoRA {url} is not a safetensors file ({type(exc).__name__}: {exc}); only .safetensors LoRAs load",
            field="lora_weights",
        ) from None


def apply_loras(pipe: Any, loras: list[tuple[Path, float, str]]) -> dict[str, Any]:
    """Load `loras` (file, scale, URL) into `pipe` (whose LoRA-able modules are this variant's own copies),
    fuse them at their scales and drop the adapter layers. Returns the modules the LoRAs touched; the caller
    puts the shared originals back for the others. InvalidInputs when a LoRA does not fit the model."""
    from safetensors.torch import load_file

    started = time.perf_counter()
    names = []
    for index, (path, _, url) in enumerate(loras):
        name = f"lora_{index}"
        try:
            pipe.load_lora_weights(load_file(str(path)), adapter_name=name)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise InvalidInputs(f"LoRA {url} does not fit this model: {exc}", field="lora_weights") from None
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise InvalidInputs(f"LoRA {url} has no weights for any module of this model", field="lora_weights")
        names.append(name)
    touched = {component for component, adapters in pipe.get_list_adapters().items() if adapters}
    pipe.set_adapters(names, adapter_weights=[scale for _, scale, _ in loras])
    pipe.fuse_lora(components=sorted(touched), adapter_names=names)
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    log.info("fused %d LoRA(s) into %s in %.0f ms", len(loras), sorted(touched), (time.perf_counter() - started) * 1e3)
    return {name: getattr(pipe, name) for name in sorted(touched)}
