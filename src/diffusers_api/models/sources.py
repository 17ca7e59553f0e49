"""Where weights come from: one function from a ModelSpec to a complete local directory.

    MODEL_URL set     -> MODELS_DIR/<normalized-id> if there, else the archive (download, verify, unpack,
                         publish), else (S3 only) the model's own source, saved as safetensors, packed, uploaded
    CHECKPOINT_URL    -> one file, downloaded and converted with diffusers' single-file loading, saved
    builtin/...       -> generated into MODELS_DIR (models/builtin.py)
    a directory       -> itself
    a hub repo id     -> diffusers' own download (only the files the pipeline needs, safetensors preferred)
                         into MODELS_DIR/hub; a copy already there is used without any network call

Runtime loading and `diffusers-api download` both go through `fetch`, so what a build downloaded is exactly
what the server later finds. With OFFLINE=1 nothing touches the network, and a model missing from disk is an
error that names the command that fixes it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputs, ModelLoadError, ModelNotFound, StorageError
from . import archive, disk, transfer
from .builtin import CONTROL_BUILTINS, ensure_builtin, is_builtin
from .locations import ARCHIVE_SUFFIX, HTTPLocation, S3Location, is_dir, parse_model_url
from .trained import is_trained_name, trained_model_dir

if TYPE_CHECKING:
    from ..config import Settings
    from .spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
PRECISIONS = {dtype: precision for precision, dtype in DTYPES.items()}
DOWNLOAD_HINT = "run `diffusers-api download` with the same model settings (at image build time) to fetch it"


@contextmanager
def phase(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the block's milliseconds to timings[name] ($timings: download, upload, ...)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = round(timings.get(name, 0.0) + (time.perf_counter() - started) * 1000, 2)


def fetch(spec: ModelSpec, settings: Settings, timings: dict[str, float] | None = None) -> Path:
    """The complete local directory of `spec`'s weights, fetching (and caching) them first if needed."""
    if spec.model_url:
        return _from_cloud_cache(spec, settings, timings)
    return _from_source(spec, settings, timings)


def torch_dtype(precision: str) -> Any:
    import torch

    return getattr(torch, DTYPES[precision]) if precision else None


def require_online(spec: ModelSpec, settings: Settings) -> None:
    if settings.offline:
        raise ModelNotFound(
            f"model {spec.describe()} is not in MODELS_DIR ({settings.models_dir}) and OFFLINE=1 forbids "
            f"fetching it: {DOWNLOAD_HINT}",
            requested=spec.model_id,
        )


# --------------------------------------------------------------------------------------------- sources


def _from_source(spec: ModelSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    if spec.checkpoint_url:
        from .checkpoint import fetch_checkpoint

        return fetch_checkpoint(spec, settings, timings)
    if spec.model_id in CONTROL_BUILTINS:
        raise ModelNotFound(
            f"{spec.model_id} is a control model, not a pipeline: name it in the request's `controlnet`",
            requested=spec.model_id,
        )
    if is_builtin(spec.model_id):
        return ensure_builtin(spec.model_id, settings.models_dir)
    if is_trained_name(spec.model_id):
        trained = trained_model_dir(spec.model_id, settings.models_dir)
        if not disk.is_published(trained):
            raise ModelNotFound(f"no model {spec.model_id} was trained here ({trained})", requested=spec.model_id)
        return trained
    local = Path(spec.model_id).expanduser()
    if is_dir(local):
        if not disk.is_published(local):  # before anything in it is read: it may be any directory
            raise ModelNotFound(
                f"model directory {spec.model_id} holds no model_index.json: it is no diffusers model",
                requested=spec.model_id,
            )
        return local
    if spec.model_id.startswith(("/", "./", "../", "~")):
        raise ModelNotFound(f"model directory {spec.model_id} does not exist", requested=spec.model_id)
    return _from_hub(spec, settings, timings)


def _from_hub(spec: ModelSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    return cached_or_downloaded(
        functools.partial(_hub_download, spec, settings),
        refuse=functools.partial(require_online, spec, settings),
        timings=timings,
        name=spec.describe(),
        requested=spec.model_id,
        not_found=lambda exc: (
            f"model {spec.describe()} is not on disk and not available from the hub: {exc}; {DOWNLOAD_HINT}"
        ),
    )


def cached_or_downloaded(
    download: Callable[..., Path],
    *,
    refuse: Callable[[], None],
    timings: dict[str, float] | None,
    name: str,
    requested: str,
    not_found: Callable[[BaseException], str],
    complete: Callable[[Path], bool] = lambda directory: True,
) -> Path:
    """A hub download that takes the copy already on disk without any network call: `download(local_files_only=)`
    first from the cache (a copy `complete` refuses is downloaded again), then, unless `refuse` raises (OFFLINE=1,
    RUNTIME_DOWNLOADS=0), from the hub, timed as the "download" phase. A repository or file the hub does not have
    is ModelNotFound (`not_found(exc)` its message, `requested` its model); any other failure a StorageError that
    names `name`."""
    try:
        directory = download(local_files_only=True)
        if complete(directory):
            return directory
    except (OSError, ValueError):
        pass  # not (completely) on disk yet
    refuse()
    with phase(timings, "download"):
        try:
            return download(local_files_only=False)
        except (OSError, ValueError) as exc:
            if caused_by(exc, not_found_errors()):
                raise ModelNotFound(not_found(exc), requested=requested) from exc
            if caused_by(exc, _invalid_id_errors()):  # the hub is not asked: the name cannot be a repository's
                raise InvalidInputs(f"{requested!r} is not a hub repository id: {exc}", requested=requested) from exc
            raise StorageError(f"hub download of {name} failed: {exc}") from exc


def _hub_download(spec: ModelSpec, settings: Settings, *, local_files_only: bool) -> Path:
    from diffusers import DiffusionPipeline

    token = settings.hf_auth_token
    folder = DiffusionPipeline.download(
        spec.hf_model_id or spec.model_id,
        cache_dir=settings.models_dir / "hub",
        revision=spec.revision,
        variant=spec.variant,
        token=token.get_secret_value() if token else None,
        local_files_only=local_files_only,
    )
    return Path(folder)


# --------------------------------------------------------------------------------------------- cloud cache


def _from_cloud_cache(spec: ModelSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    assert spec.model_url is not None
    target = settings.models_dir / spec.normalized_id
    if disk.is_published(target):
        return target
    require_online(spec, settings)
    disk.remove_stale(settings.models_dir)
    location = parse_model_url(spec.model_url, spec.normalized_id + ARCHIVE_SUFFIX, settings)
    try:
        with phase(timings, "download"):
            _download_archive(location, target, settings)
        return target
    except transfer.Missing:
        if isinstance(location, HTTPLocation):
            raise ModelNotFound(f"no model archive at {location}", requested=spec.model_id) from None
    log.info("%s is not in the cloud cache yet: building it from the model's source", location)
    source = _from_source(spec, settings, timings)
    upload_archive(target, location, settings, timings, source=lambda: _save_as_cache_entry(spec, source, target))
    return target


def _download_archive(location: S3Location | HTTPLocation, target: Path, settings: Settings) -> None:
    """Download, verify and unpack into a staging directory, then publish it under `target`."""
    with disk.temporary_file(settings.models_dir, Path(_key(location)).name) as part:
        transfer.download(location, part, settings)
        with disk.staged_directory(target) as staging, part.open("rb") as source:
            archive.unpack(source, staging)
            if not disk.is_published(staging):
                raise archive.CorruptArchive(f"the archive at {location} holds no model_index.json")
            archive.fsync_tree(staging)
            disk.publish(staging, target)


def _key(location: S3Location | HTTPLocation) -> str:
    return location.key if isinstance(location, S3Location) else location.url.rsplit("/", 1)[-1]


def _save_as_cache_entry(spec: ModelSpec, source: Path, target: Path) -> None:
    """Save `source` as safetensors in the spec's precision under `target` (unless it already is that)."""
    if source.resolve() == target.resolve():
        return
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"variant": spec.variant} if spec.variant else {}
    if spec.precision:
        kwargs["dtype"] = torch_dtype(spec.precision)  # diffusers 0.42 deprecates torch_dtype=
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {spec.describe()} from {source} to cache it: {exc}") from exc
    with disk.staged_directory(target) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        disk.publish(staging, target)


def upload_archive(
    directory: Path,
    location: S3Location | HTTPLocation,
    settings: Settings,
    timings: dict[str, float] | None = None,
    source: Callable[[], None] | None = None,
) -> None:
    """Pack `directory` as .tar.zst (hashing as it writes) and upload it to `location` (S3 only). The original's
    $timings names: `compress` (saving the directory first with `source`, if given, then packing it), `upload`."""
    if not isinstance(location, S3Location):
        raise StorageError(f"cannot upload to {location}: only s3:// MODEL_URLs are writable")
    with disk.temporary_file(settings.models_dir, Path(location.key).name) as packed:
        with phase(timings, "compress"):
            if source is not None:
                source()
            with packed.open("wb") as out:
                writer = disk.HashingWriter(out)
                archive.pack(directory, writer)
        with phase(timings, "upload"):
            transfer.s3_upload(location, packed, writer.digest.hexdigest(), settings)


# --------------------------------------------------------------------------------------------- errors


def not_found_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    # FileNotFoundError covers the hub's "not in the local cache" (LocalEntryNotFoundError)
    return (
        FileNotFoundError,
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.OfflineModeIsEnabled,
        errors.LocalEntryNotFoundError,
    )


def _invalid_id_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (errors.HFValidationError,)


def caused_by(exc: BaseException | None, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `exc` or anything in its cause chain is one of `kinds` (diffusers wraps hub errors in OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
