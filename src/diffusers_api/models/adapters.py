"""What a request adds to a model: LoRA weights (`lora_weights`) and textual inversions (`textual_inversions`).

Both change what the shared modules compute (a LoRA the UNet's and text encoders' weights, an embedding the text
encoder's vocabulary and its tokenizer), and requests share their UNet steps and text encoders. Loading them into
the loaded model would change every request in flight, so a model with adapters applied is a *variant* of it:
the modules they touch are copied, the adapters are loaded into the copies with diffusers' own loaders
(`load_lora_weights`, `load_textual_inversion`), LoRAs are fused at their scales and their adapter layers removed
again, so that the variant runs as fast as the plain model (its steps can be CUDA graphs or compiled like any
UNet's). The original's `attn_procs` files (diffusers' old UNet-only layout) load the same way. Everything else
(VAE, scheduler config, untouched modules) stays shared. Requests with the same adapters share the variant and
batch together; the store keeps a few variants per model (LORA_VARIANTS_KEPT) and drops them with it.

Files come from http(s) URLs only: checked like any URL a request brings (no private addresses unless
ALLOW_PRIVATE_URLS), capped at LORA_MAX_BYTES, read as safetensors (never pickle), and kept in
MODELS_DIR/loras and MODELS_DIR/embeddings under names derived from their URLs, written under a temporary name
and renamed when complete.
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

# kind of adapter -> its directory in MODELS_DIR, and the request field that names it (for errors)
KINDS = {"LoRA": ("loras", "lora_weights"), "textual inversion": ("embeddings", "textual_inversions")}
# The modules a LoRA may touch; each is copied for a variant only if the LoRAs do touch it.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# A textual inversion adds a token to a tokenizer and its embedding to the matching text encoder.
TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def adapter_path(url: str, models_dir: Path, kind: str = "LoRA") -> Path:
    """Where the file of `url` is kept."""
    directory, _ = KINDS[kind]
    return models_dir / directory / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.safetensors"


def fetch_adapter(url: str, settings: Settings, kind: str, timings: dict[str, float] | None = None) -> Path:
    """The local file of the adapter at `url`, downloaded on first use; `trained/<name>`: a LoRA trained here."""
    from .sources import phase
    from .trained import is_trained_name, trained_lora_path

    if kind == "LoRA" and is_trained_name(url):
        trained = trained_lora_path(url, settings.models_dir)
        if not trained.is_file():
            raise _invalid(kind, f"no LoRA {url} was trained here (looked for {trained})")
        return trained

    path = adapter_path(url, settings.models_dir, kind)
    if path.is_file():
        return path
    if settings.offline:
        raise ModelNotFound(f"{kind} {url} is not in {path.parent} and OFFLINE=1 forbids downloading it", requested=url)
    with phase(timings, "download"), disk.temporary_file(settings.models_dir, path.name) as part:
        try:
            transfer.http_download(url, part, settings, max_bytes=settings.lora_max_bytes)
        except transfer.Missing:
            raise _invalid(kind, f"{kind} {url} was not found (HTTP 404)") from None
        _check_safetensors(part, url, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, path)  # complete: published under its final name in one step
    return path


def _invalid(kind: str, message: str) -> InvalidInputs:
    return InvalidInputs(message, field=KINDS[kind][1])


def _check_safetensors(path: Path, url: str, kind: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            if not list(weights.keys()):
                raise _invalid(kind, f"{kind} {url} holds no tensors")
    except InvalidInputs:
        raise
    except Exception as exc:  # safetensors raises its own error types for every malformed file
        raise _invalid(
            kind, f"{kind} {url} is not a safetensors file ({type(exc).__name__}: {exc}); only .safetensors load"
        ) from None


# ---------------------------------------------------------------------------------------------- LoRA


def apply_loras(pipe: Any, loras: list[tuple[Path, float, str]]) -> set[str]:
    """Load `loras` (file, scale, URL) into `pipe` (whose LoRA-able modules are this variant's own copies),
    fuse them at their scales and drop the adapter layers. Returns the names of the modules they touched.
    InvalidInputs when a LoRA does not fit the model."""
    from safetensors.torch import load_file

    if not loras:
        return set()
    started = time.perf_counter()
    names = []
    for index, (path, _, url) in enumerate(loras):
        name = f"lora_{index}"
        try:
            pipe.load_lora_weights(_with_unet_prefix(load_file(str(path))), adapter_name=name)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise _invalid("LoRA", f"LoRA {url} does not fit this model: {exc}") from None
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise _invalid("LoRA", f"LoRA {url} has no weights for any module of this model")
        names.append(name)
    touched = {component for component, adapters in pipe.get_list_adapters().items() if adapters}
    pipe.set_adapters(names, adapter_weights=[scale for _, scale, _ in loras])
    pipe.fuse_lora(components=sorted(touched), adapter_names=names)
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    log.info("fused %d LoRA(s) into %s in %.0f ms", len(loras), sorted(touched), (time.perf_counter() - started) * 1e3)
    return touched


def _with_unet_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """docker-diffusers-api's `attn_procs` files (diffusers' old `unet.save_attn_procs` layout:
    `down_blocks.0....attn1.processor.to_q_lora.down.weight`) name the UNet's modules without the `unet.` that the
    pipeline's loader expects; given it, diffusers' own conversion reads them."""
    if state and all(".processor." in key and "_lora." in key and not key.startswith("unet.") for key in state):
        return {f"unet.{key}": value for key, value in state.items()}
    return state


# ---------------------------------------------------------------------------------------------- textual inversion


def apply_embeddings(pipe: Any, embeddings: list[tuple[Path, str | None, str]]) -> set[str]:
    """Load textual inversions (file, token, URL) into `pipe` (whose tokenizers and text encoders are this
    variant's own copies). SDXL embeddings hold one vector per text encoder (`clip_l`, `clip_g`). Returns the
    names of the modules they touched. InvalidInputs when an embedding does not fit the model."""
    from safetensors.torch import load_file

    touched: set[str] = set()
    for path, token, url in embeddings:
        state = load_file(str(path))
        # SDXL files hold one tensor per text encoder (clip_l, clip_g); A1111's one tensor as emb_params. Neither
        # names its token.
        per_encoder = [
            (pair, state[key]) for pair, key in zip(TEXT_PAIRS, ("clip_l", "clip_g"), strict=True) if key in state
        ]
        if token is None and (per_encoder or list(state) == ["emb_params"]):
            raise _invalid("textual inversion", f"textual inversion {url}: name its token (#token=<name>)")
        parts: list[tuple[tuple[str, str], Any]] = per_encoder or [(TEXT_PAIRS[0], state)]
        for (tokenizer, encoder), weights in parts:
            if getattr(pipe, encoder, None) is None:
                raise _invalid("textual inversion", f"textual inversion {url} needs a {encoder} this model lacks")
            try:
                pipe.load_textual_inversion(
                    weights, token=token, tokenizer=getattr(pipe, tokenizer), text_encoder=getattr(pipe, encoder)
                )
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                raise _invalid("textual inversion", f"textual inversion {url} does not fit this model: {exc}") from None
            touched |= {tokenizer, encoder}
    return touched
