"""Upscaler weights: a name -> its file -> a network, through spandrel.

Names come from UPSCALER_URLS (name=url pairs, the official Real-ESRGAN releases by default), plus
`builtin/tiny-upscaler`: a tiny, seeded, randomly initialised Real-ESRGAN Compact (SRVGGNetCompact) x4 network,
built on first use like the other builtins, so that upscaling is testable offline. A URL's file is downloaded
like a checkpoint (the same guarded, retried, size-checked transfer into a temporary name), checked to load,
and only then renamed into MODELS_DIR/upscalers; a local path is read where it is. A download needs
RUNTIME_DOWNLOADS=1 (and not OFFLINE): otherwise only files already there serve.

Weights are read as data only: `.safetensors`, or `.pth` / `.pt` / `.ckpt` through `torch.load(weights_only=True)`,
which refuses every pickle that is more than tensors and plain containers (never spandrel's `load_from_file`,
which would also run TorchScript). spandrel then recognises the architecture from the state dict's keys.

spandrel and torchvision: spandrel's package imports all its architectures, and two of them (LaMa,
RestoreFormer, neither an upscaler served here) import torchvision at module level, only to call it when they
run. torchvision is not installed beside the CPU torch of the development machines (no wheel of it imports
with that torch), so `import_spandrel` imports spandrel with stand-in torchvision modules whose functions raise,
and removes them again: nothing else ever sees them (transformers and diffusers ask whether torchvision is
installed). Where torchvision is installed (the GPU Docker image), it is the real one. spandrel itself is
installed without its dependencies (`pip install --no-deps spandrel`, as `make install` does) for that reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import InvalidInputs, ModelLoadError, ModelMismatch, ModelNotFound
from . import disk, transfer
from .sources import phase

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

TINY_UPSCALER = "builtin/tiny-upscaler"
UPSCALERS_DIR = "upscalers"
SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")  # read with torch.load(weights_only=True): data only
# Bump when the tiny upscaler's recipe changes, so that a file of the older recipe is not reused.
TINY_RECIPE_VERSION = 1
SEED_TINY_UPSCALER = 5
_TINY_LOCK = threading.Lock()
# torchvision's modules that spandrel's architectures import, and the names they take from them
_TORCHVISION_STANDINS = {
    "torchvision": (),
    "torchvision.transforms": (),
    "torchvision.transforms.functional": ("InterpolationMode", "rotate", "normalize"),
}


def upscaler_names(settings: Settings) -> list[str]:
    return sorted([*settings.upscaler_urls, TINY_UPSCALER])


def upscaler_file(name: str, settings: Settings, timings: dict[str, float] | None = None) -> Path:
    """The local weights file of the upscaler `name`, downloading it first where needed and allowed."""
    if name == TINY_UPSCALER:
        return ensure_tiny_upscaler(settings.models_dir)
    source = settings.upscaler_urls.get(name)
    if source is None:
        available = upscaler_names(settings)
        raise InvalidInputs(
            f"unknown upscaler {name!r}; available: {', '.join(available)} (UPSCALER_URLS adds more)",
            field="model",
            requested=name,
            available=available,
        )
    local = _local_path(source)
    if local is not None:
        if not local.is_file():
            raise ModelNotFound(f"upscaler {name!r}: no file at {local} (UPSCALER_URLS)", requested=name)
        return local
    suffix = Path(urlsplit(source).path).suffix.lower()  # one of UPSCALER_SUFFIXES: the settings check it
    path = cached_path(name, source, settings.models_dir, suffix)
    if path.is_file():
        return path
    _require_download_allowed(name, source, path, settings)
    with phase(timings, "download"), disk.temporary_file(path.parent, path.name) as part:
        try:
            transfer.http_download(source, part, settings)
        except transfer.Missing:
            raise ModelNotFound(f"upscaler {name!r}: {source} was not found (HTTP 404)", requested=name) from None
        load_state_dict(part, name)  # a file that does not load is never published
        os.replace(part, path)  # complete: published under its final name in one step
    return path


def cached_path(name: str, url: str, models_dir: Path, suffix: str) -> Path:
    """Where the file downloaded from `url` is kept: named after the upscaler and its URL (another URL for the
    same name is another file)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    safe_name = "".join(char if char.isalnum() or char in "-_." else "_" for char in name)
    return models_dir / UPSCALERS_DIR / f"{safe_name}-{digest}{suffix}"


def _local_path(source: str) -> Path | None:
    parts = urlsplit(source)
    if parts.scheme == "file":
        return Path(parts.path)
    if parts.scheme in ("http", "https"):
        return None
    return Path(source).expanduser()


def _require_download_allowed(name: str, url: str, path: Path, settings: Settings) -> None:
    why = "OFFLINE=1" if settings.offline else None if settings.runtime_downloads else "RUNTIME_DOWNLOADS=0"
    if why is not None:
        raise ModelMismatch(
            f"upscaler {name!r} is not downloaded yet and {why} forbids downloading it at request time: run "
            f"`diffusers-api download --upscaler {name}` (at image build time), or put its file ({url}) at {path}, "
            "or set RUNTIME_DOWNLOADS=1",
            requested=name,
        )


# ---------------------------------------------------------------------------------------------- loading


def load_state_dict(path: Path, name: str) -> dict[str, Any]:
    """The tensors of a weights file, read as data only (see the module's docstring)."""
    suffix = path.suffix.lower()
    try:
        if suffix in SAFE_SUFFIXES:
            from safetensors.torch import load_file

            return load_file(str(path))
        import torch

        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"upscaler {name!r}: cannot read {path.name} as weights ({_load_error(exc)}); only tensors are loaded, "
            "never arbitrary pickled objects",
            requested=name,
        ) from None
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"upscaler {name!r}: {path.name} holds no state dict", requested=name)
    return loaded


def _load_error(exc: Exception) -> str:
    """What torch refused, without its advice around it (to load the file with weights_only=False: to run it)."""
    if "weights only load failed" in str(exc).lower():
        boilerplate = ("Weights only load failed", "Check the documentation")
        paragraphs = [part.strip() for part in str(exc).split("\n\n") if part.strip()]
        refused = [part for part in paragraphs if not part.startswith(boilerplate)]
        return f"the pickle holds more than tensors: {' '.join(refused) or 'torch refused it'}"
    return f"{type(exc).__name__}: {exc}"


def load_upscaler(path: Path, name: str) -> Any:
    """A spandrel `ImageModelDescriptor` (the network in eval mode, with its scale) for the weights at `path`."""
    spandrel = import_spandrel()
    state_dict = spandrel.canonicalize_state_dict(load_state_dict(path, name))
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except Exception as exc:  # UnsupportedModelError, or a state dict its architecture cannot build from
        raise ModelLoadError(f"upscaler {name!r}: spandrel cannot load {path.name}: {exc}", requested=name) from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
        raise ModelLoadError(f"upscaler {name!r}: {path.name} is not an image upscaler", requested=name)
    return descriptor.eval()


def import_spandrel() -> Any:
    """spandrel, imported beside stand-in torchvision modules where torchvision is not installed (see above)."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # not installed, or installed for another torch (it then fails in its own ways)
        with _torchvision_standins():
            return _import_spandrel()
    return _import_spandrel()


def _import_spandrel() -> Any:
    try:
        import spandrel
    except ImportError as exc:
        raise ModelLoadError(
            f"upscaling needs spandrel ({exc}): pip install 'diffusers-api[upscale]', or where torchvision cannot "
            "be installed, pip install --no-deps spandrel einops"
        ) from None
    return spandrel


@contextmanager
def _torchvision_standins() -> Iterator[None]:
    saved = {name: sys.modules.get(name) for name in _TORCHVISION_STANDINS}
    for module_name, names in _TORCHVISION_STANDINS.items():
        module = types.ModuleType(module_name, "stand-in while spandrel is imported (models/upscalers.py)")
        for attribute in names:
            setattr(module, attribute, _unavailable(f"{module_name}.{attribute}"))
        sys.modules[module_name] = module
    try:
        yield
    finally:
        for module_name, saved_module in saved.items():
            if saved_module is None:
                sys.modules.pop(module_name, None)
            else:
                sys.modules[module_name] = saved_module


def _unavailable(name: str) -> Any:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ModelLoadError(f"{name} is needed by this spandrel architecture, and torchvision is not installed")

    return unavailable


# ---------------------------------------------------------------------------------------------- builtin


def ensure_tiny_upscaler(models_dir: Path) -> Path:
    """The file of `builtin/tiny-upscaler`, built and written (atomically) on first use."""
    path = Path(models_dir) / UPSCALERS_DIR / f"builtin--tiny-upscaler-v{TINY_RECIPE_VERSION}.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file

    from .builtin import build_tiny_upscaler

    with _TINY_LOCK:
        if not path.is_file():
            with disk.temporary_file(path.parent, path.name) as part:
                save_file(build_tiny_upscaler(), str(part))
                os.replace(part, path)
    return path
