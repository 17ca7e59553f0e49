"""ControlNets and T2I-Adapters by reference: fetched like any model, kept resident in the store's LRU.

A request's `controlnet` entries name control models (schema/controls.py). Each is resolved to a local directory
(`fetch_control`: builtin, local directory, hub repository, or a cloud-cache archive URL), loaded in the served
model's dtype and device (`load_control`), and kept by the model store beside the models, its bytes counted
against MODEL_MEMORY_BUDGET (models/store.py). With RUNTIME_DOWNLOADS=0 only control models already on disk (or
built in) load; any other is MODEL_MISMATCH.

The request then runs with diffusers' ControlNet or T2I-Adapter pipeline for its task, built over the served
model's components with the control modules added (`control_pipeline`, `control_arguments`).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputs, ModelLoadError, ModelMismatch, ModelNotFound
from . import archive, disk, transfer
from .builtin import CONTROL_BUILTINS, ensure_builtin, is_builtin
from .locations import ARCHIVE_SUFFIX, is_dir, local_path, parse_model_url
from .sizes import module_bytes
from .sources import DOWNLOAD_HINT, cached_or_downloaded, caused_by, not_found_errors, phase

if TYPE_CHECKING:
    from ..config import Settings
    from ..schema.controls import ControlInput

log = logging.getLogger(__name__)

# The module class each `type` loads as.
_CLASSES = {"controlnet": "ControlNetModel", "t2i": "T2IAdapter"}
# The hub files a control model needs (config and safetensors weights; the fp16 variants too).
_HUB_FILES = ["config.json", "*.safetensors"]


@dataclass(frozen=True)
class ControlSpec:
    """One control model, in one dtype on one device (the served model's): the key of the store's LRU."""

    source: str  # hub id, local directory, builtin/..., or an archive URL
    kind: str  # "controlnet" | "t2i"
    dtype: str  # e.g. "float16"
    device: str

    @classmethod
    def of(cls, control: ControlInput, dtype: str, device: str) -> ControlSpec:
        return cls(control.source, control.type, dtype, device)

    @property
    def is_url(self) -> bool:
        return "://" in self.source

    def describe(self) -> str:
        return f"{self.kind} {self.source}"


@dataclass
class LoadedControl:
    spec: ControlSpec
    module: Any  # ControlNetModel or T2IAdapter
    bytes: int
    load_ms: float

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {"model": spec.source, "type": spec.kind, "dtype": spec.dtype, "device": spec.device} | {
            "bytes": self.bytes,
            "load_ms": round(self.load_ms, 2),
        }


# ---------------------------------------------------------------------------------------------- fetching


def fetch_control(spec: ControlSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    """The local directory of a control model; fetched first where RUNTIME_DOWNLOADS (and OFFLINE) allow."""
    if spec.is_url:
        return _from_archive(spec, settings, timings)
    if is_builtin(spec.source):
        if spec.source not in CONTROL_BUILTINS:
            raise ModelNotFound(
                f"controlnet: {spec.source} is not a built-in control model",
                requested=spec.source,
                available=sorted(CONTROL_BUILTINS),
            )
        return ensure_builtin(spec.source, settings.models_dir)
    _check_inside_roots(spec.source, settings)
    local = Path(spec.source).expanduser()
    if is_dir(local):
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"controlnet: directory {spec.source} holds no config.json", requested=spec.source)
        return local
    if spec.source.startswith(("/", "./", "../", "~")):
        raise ModelNotFound(f"controlnet: directory {spec.source} does not exist", requested=spec.source)
    return _from_hub(spec, settings, timings)


def _check_inside_roots(source: str, settings: Settings) -> None:
    """As for a model directory (locations.check_request_paths): a request may name a place on this machine only
    inside MODELS_DIR and LOCAL_MODEL_ROOTS, links resolved, checked before anything there is read."""
    path = local_path(source)
    if path is None:
        return
    roots = [Path(os.path.realpath(root)) for root in (settings.models_dir, *settings.local_model_roots)]
    if not any(Path(os.path.realpath(path)).is_relative_to(root) for root in roots):
        raise InvalidInputs(
            f"controlnet: {source!r} is a path outside MODELS_DIR and LOCAL_MODEL_ROOTS, the directories a request "
            "may load from",
            field="controlnet",
            setting="LOCAL_MODEL_ROOTS",
        )


def _not_on_disk(spec: ControlSpec, settings: Settings) -> None:
    """Refuse to fetch a control model that is not on disk, where the settings forbid fetching."""
    if not settings.runtime_downloads:
        raise ModelMismatch(
            f"controlnet: {spec.source} is not on disk, and RUNTIME_DOWNLOADS=0 forbids fetching it; "
            f"{DOWNLOAD_HINT}, or set RUNTIME_DOWNLOADS=1",
            requested=spec.source,
        )
    if settings.offline:
        raise ModelNotFound(
            f"controlnet: {spec.source} is not in MODELS_DIR ({settings.models_dir}) and OFFLINE=1 forbids fetching it",
            requested=spec.source,
        )


def _from_hub(spec: ControlSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    return cached_or_downloaded(
        functools.partial(_hub_download, spec, settings),
        refuse=functools.partial(_not_on_disk, spec, settings),
        timings=timings,
        name=f"controlnet {spec.source}",
        requested=spec.source,
        not_found=lambda exc: f"controlnet: {spec.source} is not on disk and not on the hub: {exc}",
    )


def _hub_download(spec: ControlSpec, settings: Settings, *, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    token = settings.hf_auth_token
    folder = Path(
        snapshot_download(
            spec.source,
            cache_dir=settings.models_dir / "hub",
            allow_patterns=_HUB_FILES,
            token=token.get_secret_value() if token else None,
            local_files_only=local_files_only,
        )
    )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{spec.source} has no config.json")
    return folder


def _archive_dir(spec: ControlSpec, settings: Settings) -> Path:
    """Where an archive URL's model is unpacked: named after the URL's last part (without .tar.zst)."""
    name = spec.source.rstrip("/").rsplit("/", 1)[-1].removesuffix(ARCHIVE_SUFFIX) or "archive"
    return settings.models_dir / f"controls--{name}"


def _from_archive(spec: ControlSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    target = _archive_dir(spec, settings)
    if _is_control_dir(target):
        return target
    _not_on_disk(spec, settings)
    location = parse_model_url(spec.source, target.name + ARCHIVE_SUFFIX, settings)
    with phase(timings, "download"), disk.temporary_file(settings.models_dir, target.name) as part:
        try:
            transfer.download(location, part, settings)
        except transfer.Missing:
            raise ModelNotFound(f"controlnet: no archive at {location}", requested=spec.source) from None
        with disk.staged_directory(target) as staging, part.open("rb") as source:
            archive.unpack(source, staging)
            if not _is_control_dir(staging):
                raise archive.CorruptArchive(f"the archive at {location} holds no config.json")
            archive.fsync_tree(staging)
            disk.publish(staging, target, complete=_is_control_dir)
    return target


def _is_control_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- loading


def load_control(spec: ControlSpec, directory: Path) -> LoadedControl:
    """Load a control model from its directory onto the served model's device, in its dtype."""
    import diffusers
    import torch

    wanted = _CLASSES[spec.kind]
    found = _class_name(directory)
    if found is not None and found != wanted:
        kind = next((kind for kind, name in _CLASSES.items() if name == found), None)
        hint = f": set its type to {kind!r}" if kind else ""
        raise InvalidInputs(f"controlnet: {spec.source} is a {found}, not a {wanted}{hint}", field="controlnet")
    started = time.perf_counter()
    try:
        module = getattr(diffusers, wanted).from_pretrained(directory, dtype=getattr(torch, spec.dtype, None))
    except (OSError, ValueError) as exc:
        if caused_by(exc, not_found_errors()):
            raise ModelNotFound(f"controlnet: {spec.source} not found: {exc}", requested=spec.source) from exc
        raise ModelLoadError(f"could not load controlnet {spec.source} from {directory}: {exc}") from exc
    module.to(spec.device).eval()
    elapsed = (time.perf_counter() - started) * 1000
    log.info("loaded %s from %s in %.0f ms", spec.describe(), directory, elapsed)
    return LoadedControl(spec, module, module_bytes(module), elapsed)


def _class_name(directory: Path) -> str | None:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("_class_name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


# ---------------------------------------------------------------------------------------------- pipelines

# The served request's pipeline -> (family, task); the control pipelines of each.
_TASKS = {
    "StableDiffusionPipeline": ("StableDiffusion", ""),
    "StableDiffusionImg2ImgPipeline": ("StableDiffusion", "Img2Img"),
    "StableDiffusionInpaintPipeline": ("StableDiffusion", "Inpaint"),
    "StableDiffusionXLPipeline": ("StableDiffusionXL", ""),
    "StableDiffusionXLImg2ImgPipeline": ("StableDiffusionXL", "Img2Img"),
    "StableDiffusionXLInpaintPipeline": ("StableDiffusionXL", "Inpaint"),
}


def control_pipeline(pipe_cls: Any, controls: list[ControlInput], image_prompt: bool = False) -> Any:
    """The diffusers pipeline class that runs `pipe_cls`'s task with `controls` (and an IP-Adapter's image prompt,
    where `image_prompt`), or INVALID_INPUTS."""
    cls = _control_pipeline(pipe_cls, controls)
    if image_prompt and "ip_adapter_image" not in _parameters(cls):
        raise InvalidInputs(f"controlnet: {cls.__name__} takes no ip_adapter image prompt", field="ip_adapter")
    return cls


def _control_pipeline(pipe_cls: Any, controls: list[ControlInput]) -> Any:
    import diffusers

    name = pipe_cls.__name__
    if name not in _TASKS:
        supported = ", ".join(_TASKS)
        raise InvalidInputs(f"controlnet: runs with {supported}; not with {name}", field="controlnet")
    family, task = _TASKS[name]
    if controls[0].type == "t2i":
        if task:
            raise InvalidInputs(f"controlnet: T2I-Adapters run with text-to-image only, not with {name}")
        if family == "StableDiffusion" and any(control.end != 1.0 for control in controls):
            raise InvalidInputs("controlnet: a T2I-Adapter on Stable Diffusion 1/2 acts on every step: `end` must be 1")
        return getattr(diffusers, f"{family}AdapterPipeline")
    return getattr(diffusers, f"{family}ControlNet{task}Pipeline")


def check_fits(control: LoadedControl, unet: Any) -> None:
    """Refuse a control model made for another UNet (its outputs would not fit the UNet's blocks)."""
    config, unet_config = control.module.config, unet.config
    if control.spec.kind == "controlnet":
        mine, theirs = config.cross_attention_dim, unet_config.cross_attention_dim
        fits = mine == theirs and config.addition_embed_type == unet_config.addition_embed_type
        what = f"cross_attention_dim {mine}, addition_embed_type {config.addition_embed_type}"
        served = f"{theirs}, {unet_config.addition_embed_type}"
    else:
        blocks = list(unet_config.block_out_channels)
        fits = list(config.channels)[: len(blocks)] == blocks
        what, served = f"channels {list(config.channels)}", f"block_out_channels {blocks}"
    if not fits:
        raise InvalidInputs(
            f"controlnet: {control.spec.source} ({what}) does not fit this model's UNet ({served})", field="controlnet"
        )


def control_modules(control_cls: Any, modules: list[Any]) -> dict[str, Any]:
    """The pipeline components that carry the control modules (the pipelines wrap a list in their Multi* class)."""
    role = "controlnet" if "controlnet" in inspect.signature(control_cls.__init__).parameters else "adapter"
    return {role: modules[0] if len(modules) == 1 else modules}


def control_arguments(
    control_cls: Any, controls: list[ControlInput], images: list[Any], call: dict[str, Any]
) -> dict[str, Any]:
    """The `__call__` arguments of `control_cls` for `controls` with their decoded `images`, laid over `call` (the
    request's own arguments, whose `image` is the init image for img2img and inpainting)."""
    one = len(controls) == 1

    def each(values: list[Any]) -> Any:
        return values[0] if one else values

    arguments = dict(call)
    scales = [control.scale for control in controls]
    if controls[0].type == "t2i":
        arguments |= {"image": each(images), "adapter_conditioning_scale": each(scales)}
        if "adapter_conditioning_factor" in _parameters(control_cls):
            arguments["adapter_conditioning_factor"] = controls[0].end if one else min(c.end for c in controls)
        return arguments
    key = "control_image" if "control_image" in _parameters(control_cls) else "image"
    arguments |= {
        key: each(images),
        "controlnet_conditioning_scale": each(scales),
        "control_guidance_start": each([control.start for control in controls]),
        "control_guidance_end": each([control.end for control in controls]),
    }
    return arguments


def _parameters(cls: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__call__).parameters)
