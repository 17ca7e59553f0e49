"""CHECKPOINT_URL: one original-format checkpoint file, converted once into a diffusers directory.

The file (http(s)://, any s3 form of MODEL_URL, or a local path) is downloaded to a temporary name, converted
with diffusers' own single-file loading (`from_single_file`), saved as safetensors under
MODELS_DIR/<normalized-id>, and from then on loaded like any other directory. Pickled checkpoints (`.ckpt`,
`.pt`, `.pth`, `.bin`) can run code when loaded: they are refused unless ALLOW_PICKLE=1.

diffusers needs the pipeline's configuration (component configs, tokenizer, scheduler) besides the weights:
HF_MODEL_ID, when set, names it (a local diffusers directory or a hub repo); otherwise diffusers infers the
model family from the checkpoint's keys and fetches the matching reference configuration from the hub.
CHECKPOINT_CONFIG_URL (as docker-diffusers-api took it: the original repository's .yaml, e.g. v1-inference.yaml)
gives the UNet's and VAE's architecture instead, passed to diffusers as `original_config`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import InvalidInputs, ModelLoadError
from . import disk, transfer
from .locations import S3Location, parse_model_url
from .sources import phase, require_online, torch_dtype

if TYPE_CHECKING:
    from ..config import Settings
    from .spec import ModelSpec

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# An original config is a few KB of YAML; anything much larger is not one.
CONFIG_MAX_BYTES = 1024 * 1024
# What diffusers' own key inspection calls a model family -> the pipeline class that loads it.
_FAMILY_PIPELINES = {"xl_base": "StableDiffusionXLPipeline", "xl_inpaint": "StableDiffusionXLInpaintPipeline"}


def fetch_checkpoint(spec: ModelSpec, settings: Settings, timings: dict[str, float] | None) -> Path:
    """The diffusers directory converted from spec.checkpoint_url, converting it first if needed."""
    assert spec.checkpoint_url is not None
    filename = checked_filename(spec.checkpoint_url, settings)
    target = settings.models_dir / spec.normalized_id
    if disk.is_published(target):
        return target
    local = _local_path(spec.checkpoint_url, "checkpoint_url")
    if local is not None:
        with _original_config(spec, settings, timings) as config:
            _convert(spec, local, target, settings, config)
        return target
    require_online(spec, settings)
    with (
        disk.temporary_file(settings.models_dir, filename) as part,
        _original_config(spec, settings, timings) as config,
    ):
        with phase(timings, "download"):
            _download(spec.checkpoint_url, part, settings)
        _convert(spec, part, target, settings, config)
    return target


@contextmanager
def _original_config(spec: ModelSpec, settings: Settings, timings: dict[str, float] | None) -> Iterator[Path | None]:
    """CHECKPOINT_CONFIG_URL as a local file (downloaded to a temporary name, like the checkpoint), checked to be
    an original-SD config; None without one."""
    url = spec.checkpoint_config_url
    if not url:
        yield None
        return
    local = _local_path(url, "checkpoint_config_url")
    if local is not None:
        yield _checked_config(local, url)
        return
    require_online(spec, settings)
    with disk.temporary_file(settings.models_dir, "original-config.yaml") as part:
        with phase(timings, "download"):
            location = parse_model_url(url, "", settings)
            if isinstance(location, S3Location):
                _or_not_found(lambda: transfer.s3_download(location, part, settings), url, "config")
            else:
                fetch = lambda: transfer.http_download(url, part, settings, max_bytes=CONFIG_MAX_BYTES)  # noqa: E731
                _or_not_found(fetch, url, "config")
        yield _checked_config(part, url)


def _checked_config(path: Path, url: str) -> Path:
    """`path`, if it holds a YAML mapping with the `model` section diffusers reads its architecture from."""
    import yaml

    try:
        config = yaml.safe_load(path.read_bytes()[: CONFIG_MAX_BYTES + 1])
    except (yaml.YAMLError, OSError) as exc:
        raise InvalidInputs(
            f"CHECKPOINT_CONFIG_URL {url}: not a YAML file ({exc})", field="checkpoint_config_url"
        ) from None
    if path.stat().st_size > CONFIG_MAX_BYTES or not isinstance(config, dict) or "model" not in config:
        raise InvalidInputs(
            f"CHECKPOINT_CONFIG_URL {url}: not an original Stable Diffusion config (a .yaml with a `model` section)",
            field="checkpoint_config_url",
        )
    return path


def checked_filename(url: str, settings: Settings) -> str:
    """The checkpoint's file name, if its format may be loaded: safetensors, or pickle with ALLOW_PICKLE=1."""
    name = Path(urlsplit(url).path).name
    suffix = Path(name).suffix.lower()
    if suffix in SAFE_SUFFIXES:
        return name
    if suffix in PICKLE_SUFFIXES:
        if settings.allow_pickle:
            return name
        raise InvalidInputs(
            f"CHECKPOINT_URL {name!r} is a pickled checkpoint, which can run arbitrary code when loaded: "
            "convert it to .safetensors, or set ALLOW_PICKLE=1 if you trust its source",
            field="checkpoint_url",
            setting="ALLOW_PICKLE",
        )
    raise InvalidInputs(
        f"CHECKPOINT_URL {name!r}: expected a .safetensors file (or, with ALLOW_PICKLE=1, .ckpt)",
        field="checkpoint_url",
    )


def _local_path(url: str, field: str) -> Path | None:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path)
    if not parts.scheme:
        path = Path(url).expanduser()
        if not path.is_file():
            raise InvalidInputs(f"{field.upper()} {url!r}: no such file", field=field)
        return path
    return None


def _download(url: str, dest: Path, settings: Settings) -> None:
    location = parse_model_url(url, "", settings)
    if isinstance(location, S3Location):
        _or_not_found(lambda: transfer.s3_download(location, dest, settings), url)
    else:
        _or_not_found(lambda: transfer.http_download(url, dest, settings), url)


def _or_not_found(download: Any, url: str, what: str = "checkpoint") -> None:
    from ..errors import ModelNotFound

    try:
        download()
    except transfer.Missing:
        raise ModelNotFound(f"no {what} at {url}", requested=url) from None


def _convert(spec: ModelSpec, checkpoint: Path, target: Path, settings: Settings, config: Path | None) -> None:
    pipeline_class = _pipeline_class(spec, checkpoint)
    kwargs: dict[str, Any] = {"local_files_only": settings.offline}
    if spec.hf_model_id:
        kwargs["config"] = spec.hf_model_id
    if config is not None:  # the UNet's and VAE's architecture (and the scheduler's) come from it
        kwargs["original_config"] = str(config)
    if spec.precision:
        kwargs["dtype"] = torch_dtype(spec.precision)  # diffusers 0.42 deprecates torch_dtype=
    try:
        pipe = pipeline_class.from_single_file(str(checkpoint), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"could not convert checkpoint {spec.checkpoint_url}: {type(exc).__name__}: {exc}"
        ) from exc
    with disk.staged_directory(target) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        disk.publish(staging, target)
    log.info("converted %s into %s", spec.checkpoint_url, target)


def _pipeline_class(spec: ModelSpec, checkpoint: Path) -> Any:
    """The configuration's own class when HF_MODEL_ID is a local directory, else the checkpoint's family."""
    import diffusers

    config_dir = Path(spec.hf_model_id).expanduser() if spec.hf_model_id else None
    if config_dir is not None and (config_dir / "model_index.json").is_file():
        name = json.loads((config_dir / "model_index.json").read_text())["_class_name"]
    else:
        name = _family_pipeline(checkpoint)
    return getattr(diffusers, name)


def _family_pipeline(checkpoint: Path) -> str:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    family = infer_diffusers_model_type(load_single_file_checkpoint(str(checkpoint), local_files_only=True))
    if family in _FAMILY_PIPELINES:
        return _FAMILY_PIPELINES[family]
    return "StableDiffusionInpaintPipeline" if "inpainting" in family else "StableDiffusionPipeline"
