"""IP-Adapters (`ip_adapter`): an image prompt, weighed by a scale, for Stable Diffusion 1.x/2.x and SDXL models.

Loading an IP-Adapter replaces the UNet's cross-attention processors and adds an image projection
(`encoder_hid_proj`): done to the loaded model's UNet, it would change every request in flight. So a model with an
IP-Adapter is a *variant* of it (`IPAdapterVariant`), kept beside the model (a few per model, least recently used
dropped first), whose UNet is a second module over the *same parameter tensors* (`shared_unet`: no second copy of
the UNet's weights), into which diffusers' own `load_ip_adapter` loads the adapter's layers and image encoder.
Every other component (VAE, text encoders, tokenizers, scheduler config) is the model's own.

The scale lives in the attention processors (diffusers' `set_ip_adapter_scale`), so requests using one variant
take turns (`IPAdapterVariant.scaled`); plain requests and other variants run meanwhile.

Where the adapter comes from (`fetch_ip_adapter`): a builtin (builtin/tiny-ip-adapter, -sdxl), a local directory
(inside MODELS_DIR or LOCAL_MODEL_ROOTS), or a hub repository, of which only the weight file and the image encoder
are downloaded into MODELS_DIR/hub (not with OFFLINE=1, and not with RUNTIME_DOWNLOADS=0 unless already there).
Weights load from .safetensors only (never pickle).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputs, ModelMismatch, ModelNotFound
from .builtin import is_builtin
from .builtin_ip_adapter import ensure_builtin_ip_adapter
from .locations import local_path
from .sources import cached_or_downloaded, phase

if TYPE_CHECKING:
    from ..config import Settings
    from ..pipelines import ModelPipelines
    from ..schema import IPAdapter

log = logging.getLogger(__name__)

FIELD = "ip_adapter"
# diffusers' families whose pipelines take `ip_adapter_image` through IPAdapterMixin (auto_pipeline's names)
FAMILIES = ("stable-diffusion", "stable-diffusion-xl")


@dataclass(frozen=True)
class IPAdapterSpec:
    """Which adapter: its repository or directory, and where in it the weights and the image encoder are."""

    model: str
    subfolder: str = ""
    weight_name: str | None = None
    image_encoder_folder: str = "image_encoder"
    url: str | None = None  # its cloud-cache archive

    @classmethod
    def of(cls, adapter: IPAdapter) -> IPAdapterSpec:
        return cls(adapter.model, adapter.subfolder, adapter.weight_name, adapter.image_encoder_folder, adapter.url)

    @property
    def cache_id(self) -> str:
        """Its name in MODELS_DIR and (with `.tar.zst`) its default key in the cloud cache."""
        parts = [self.model, self.subfolder, (self.weight_name or "").removesuffix(".safetensors")]
        return "ip-adapters--" + "--".join(part.replace("/", "--") for part in parts if part)

    def describe(self) -> str:
        where = "/".join(part for part in (self.subfolder, self.weight_name or "") if part)
        return f"{self.model}" + (f" ({where})" if where else "")

    @property
    def encoder_prefix(self) -> str:
        """The image encoder's folder in the repository, as diffusers' load_ip_adapter finds it."""
        if "/" in self.image_encoder_folder:
            return self.image_encoder_folder
        return PurePosixPath(self.subfolder, self.image_encoder_folder).as_posix()


@dataclass(eq=False)
class IPAdapterVariant:
    """A model with one IP-Adapter loaded: its pipelines (the model's components but the UNet), and what it adds."""

    spec: IPAdapterSpec
    pipelines: ModelPipelines
    bytes: int  # of its own weights: the adapter's layers and image encoder (the UNet's are the model's)
    load_ms: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """Run one request at `scale`: the scale is the processors' state, so one request at a time."""
        with self.lock:
            self.pipelines.base.set_ip_adapter_scale(scale)
            yield

    def describe(self) -> dict[str, Any]:
        return {"ip_adapter": self.spec.describe(), "bytes": self.bytes, "load_ms": round(self.load_ms, 2)}


def check_family(pipe_cls: Any) -> None:
    """INVALID_INPUTS unless `pipe_cls` is a Stable Diffusion 1.x/2.x or SDXL pipeline that takes an image prompt."""
    from diffusers.pipelines import auto_pipeline

    family = auto_pipeline._get_model(pipe_cls.__name__)
    params = _call_parameter_names(pipe_cls)
    if family not in FAMILIES or "ip_adapter_image" not in params:
        raise InvalidInputs(
            f"{FIELD}: IP-Adapters run with Stable Diffusion 1.x/2.x and SDXL pipelines; "
            f"{pipe_cls.__name__} is {family or 'another'} family",
            field=FIELD,
            family=family,
        )


def _call_parameter_names(pipe_cls: Any) -> set[str]:
    from ..pipelines import call_arguments

    return set(call_arguments(pipe_cls))


# ---------------------------------------------------------------------------------------------- fetching


def fetch_ip_adapter(spec: IPAdapterSpec, settings: Settings, timings: dict[str, float] | None = None) -> Path:
    """The local directory holding `spec`'s weight file and image encoder, fetched first if needed (from its
    cloud-cache archive when it names one)."""
    if spec.url:
        return _from_cloud_cache(spec, settings, timings)
    if is_builtin(spec.model):
        return ensure_builtin_ip_adapter(spec.model, settings.models_dir)
    path = local_path(spec.model)
    if path is not None:
        _check_root(path, settings)
        if not path.is_dir():
            raise ModelNotFound(f"IP-Adapter directory {spec.model} does not exist", requested=spec.model)
        return path
    return _from_hub(spec, settings, timings)


def weight_file(directory: Path, spec: IPAdapterSpec) -> str:
    """The weight file's name: the one given, or the only .safetensors file of the subfolder."""
    folder = directory / spec.subfolder
    if spec.weight_name is not None:
        if not (folder / spec.weight_name).is_file():
            raise ModelNotFound(
                f"IP-Adapter {spec.model} has no {PurePosixPath(spec.subfolder, spec.weight_name)}",
                requested=spec.model,
            )
        return spec.weight_name
    found = sorted(path.name for path in folder.glob("*.safetensors")) if folder.is_dir() else []
    if len(found) != 1:
        raise InvalidInputs(
            f"{FIELD}.weight_name: name the weight file of IP-Adapter {spec.model} "
            f"({len(found)} .safetensors files in {spec.subfolder or 'its top folder'}: {', '.join(found) or 'none'})",
            field=f"{FIELD}.weight_name",
        )
    return found[0]


def _check_root(path: Path, settings: Settings) -> None:
    roots = [Path(os.path.realpath(root)) for root in (settings.models_dir, *settings.local_model_roots)]
    if not any(Path(os.path.realpath(path)).is_relative_to(root) for root in roots):
        raise InvalidInputs(
            f"{FIELD}.model {str(path)!r} is a path outside MODELS_DIR and LOCAL_MODEL_ROOTS, the directories a "
            "request may load from",
            field=f"{FIELD}.model",
            setting="LOCAL_MODEL_ROOTS",
        )


def _from_hub(spec: IPAdapterSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    if spec.weight_name is None:
        raise InvalidInputs(
            f"{FIELD}.weight_name: required for the hub repository {spec.model} (e.g. ip-adapter_sd15.safetensors)",
            field=f"{FIELD}.weight_name",
        )
    weight_name = spec.weight_name
    return cached_or_downloaded(
        functools.partial(_hub_download, spec, settings),
        refuse=functools.partial(_forbid_download, spec, settings),
        timings=timings,
        name=f"IP-Adapter {spec.describe()}",
        requested=spec.model,
        not_found=lambda exc: f"IP-Adapter {spec.describe()} not found: {exc}",
        complete=lambda directory: (directory / spec.subfolder / weight_name).is_file(),
    )


def _forbid_download(spec: IPAdapterSpec, settings: Settings) -> None:
    if settings.offline or not settings.runtime_downloads:
        why = "OFFLINE=1" if settings.offline else "RUNTIME_DOWNLOADS=0"
        raise ModelMismatch(
            f"IP-Adapter {spec.describe()} is not in MODELS_DIR ({settings.models_dir}) and {why} forbids "
            "downloading it",
            requested=spec.model,
        )


def _hub_download(spec: IPAdapterSpec, settings: Settings, *, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    assert spec.weight_name is not None
    token = settings.hf_auth_token
    folder = snapshot_download(
        spec.model,
        allow_patterns=[PurePosixPath(spec.subfolder, spec.weight_name).as_posix(), f"{spec.encoder_prefix}/*"],
        cache_dir=settings.models_dir / "hub",
        token=token.get_secret_value() if token else None,
        local_files_only=local_files_only,
    )
    return Path(folder)


# ---------------------------------------------------------------------------------------------- cloud cache

CACHE_MARKER = "ip_adapter.json"  # written last into a published cache entry


def _from_cloud_cache(spec: IPAdapterSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    """As MODEL_URL for models (models/sources.py): MODELS_DIR/<cache_id> if there; else the archive at `url`
    (a tar.zst of the adapter's files), downloaded and unpacked; else, for s3, the adapter fetched from `model`,
    kept, packed and uploaded."""
    from . import archive, disk, transfer
    from .locations import ARCHIVE_SUFFIX, S3Location, parse_model_url
    from .sources import upload_archive

    assert spec.url is not None
    target = settings.models_dir / spec.cache_id
    if _cached(target):
        return target
    _forbid_download(spec, settings)
    try:
        location = parse_model_url(spec.url, spec.cache_id + ARCHIVE_SUFFIX, settings)
    except InvalidInputs as exc:
        raise InvalidInputs(exc.message.replace("MODEL_URL", f"{FIELD}.url"), field=f"{FIELD}.url") from None
    try:
        with phase(timings, "download"), disk.temporary_file(settings.models_dir, target.name) as part:
            transfer.download(location, part, settings)
            with disk.staged_directory(target) as staging, part.open("rb") as source:
                archive.unpack(source, staging)
                (staging / CACHE_MARKER).write_text(json.dumps({"model": spec.model}) + "\n")
                disk.publish(staging, target, complete=_cached, replace_others=True)
        return target
    except transfer.Missing:
        if not isinstance(location, S3Location):
            raise ModelNotFound(f"no IP-Adapter archive at {location}", requested=spec.model) from None
    log.info("%s is not in the cloud cache yet: building it from %s", location, spec.model)
    origin = fetch_ip_adapter(dataclasses.replace(spec, url=None), settings, timings)
    with phase(timings, "upload"), disk.staged_directory(target) as staging:
        weight_name = weight_file(origin, spec)
        for relative in (PurePosixPath(spec.subfolder, weight_name), PurePosixPath(spec.encoder_prefix)):
            copy = shutil.copytree if (origin / relative).is_dir() else shutil.copy2
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            copy(origin / relative, staging / relative)
        upload_archive(staging, location, settings)
        (staging / CACHE_MARKER).write_text(json.dumps({"model": spec.model}) + "\n")
        disk.publish(staging, target, complete=_cached, replace_others=True)
    return target


def _cached(directory: Path) -> bool:
    return (directory / CACHE_MARKER).is_file()


# ---------------------------------------------------------------------------------------------- the variant


def make_variant(pipelines: ModelPipelines, directory: Path, spec: IPAdapterSpec) -> IPAdapterVariant:
    """`pipelines`' model with the IP-Adapter in `directory` loaded into a UNet sharing the model's weights."""
    from ..pipelines import ModelPipelines

    started = time.perf_counter()
    weight_name = weight_file(directory, spec)
    base_unet = pipelines.components["unet"]
    unet = shared_unet(base_unet)
    # The model's own pipeline class over its components, but this UNet and no image encoder: load_ip_adapter
    # then loads the adapter's encoder (and makes a feature extractor where the model has none).
    pipe = pipelines._new(type(pipelines.base), pipelines.components | {"unet": unet, "image_encoder": None})
    try:
        pipe.load_ip_adapter(
            str(directory),
            subfolder=spec.subfolder,
            weight_name=weight_name,
            image_encoder_folder=spec.image_encoder_folder,
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise InvalidInputs(
            f"{FIELD}: IP-Adapter {spec.describe()} does not fit this model: {type(exc).__name__}: {exc}", field=FIELD
        ) from None
    if getattr(pipe, "image_encoder", None) is None:
        raise InvalidInputs(f"{FIELD}: IP-Adapter {spec.describe()} has no {spec.encoder_prefix}/", field=FIELD)
    variant = ModelPipelines(pipe)
    variant._tokenizers = pipelines._tokenizers  # the same tokenizers: the same locks
    elapsed = (time.perf_counter() - started) * 1000
    size = own_bytes(unet, base_unet) + _module_bytes(pipe.image_encoder)
    log.info("loaded IP-Adapter %s (%d bytes of its own) in %.0f ms", spec.describe(), size, elapsed)
    return IPAdapterVariant(spec, variant, size, elapsed)


def shared_unet(unet: Any) -> Any:
    """A second UNet module of `unet`'s class and config whose parameters and buffers *are* `unet`'s (the same
    tensors): built on the meta device (allocating nothing) and given `unet`'s tensors by assignment. Its
    attention processors and added modules are its own, so loading an adapter into it leaves `unet` as it was."""
    import torch

    with torch.device("meta"):
        shell = type(unet).from_config(unet.config)
    shell.load_state_dict(unet.state_dict(keep_vars=True), strict=True, assign=True)
    left = [name for name, tensor in (*shell.named_parameters(), *shell.named_buffers()) if tensor.is_meta]
    if left:  # a non-persistent buffer has no entry in the state dict: it would stay without data
        raise RuntimeError(f"cannot share the UNet's tensors: {', '.join(left[:5])} have none")
    shell.set_attn_processor(dict(unet.attn_processors))  # stateless processors, shared as the UNet has them
    return shell.eval()


def own_bytes(module: Any, base: Any) -> int:
    """Bytes of the tensors of `module` that are not `base`'s."""
    shared = {tensor.data_ptr() for tensor in (*base.parameters(), *base.buffers())}
    tensors = (*module.parameters(), *module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.data_ptr() not in shared)


def _module_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
