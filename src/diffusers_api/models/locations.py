"""Names and places: the normalized id of a model, and where a MODEL_URL points.

The normalized id names one set of weights in one precision, on disk (MODELS_DIR/<id>) and in the cloud cache
(<id>.tar.zst): `models--org--name` plus `--revision`, `--variant`, `--precision` where set.

MODEL_URL forms and the rule that tells them apart:

    s3://                              default endpoint, default bucket, default key
    s3:///bucket/key                   default endpoint (three slashes: the host part is empty)
    s3://endpoint-host/bucket/key      the original form: an https endpoint host, then bucket and key
    s3://bucket/key                    the standard form: bucket and key on the default endpoint
    http+s3://host[:port]/bucket/key   an http endpoint (https+s3:// for https)
    http(s)://host/path/x.tar.zst      a plain archive over HTTP(S), read-only

The host part of `s3://` is an *endpoint* when it looks like one: it has a port, a dot, or is `localhost`
(`s3://minio.local:9000/bucket/key`, `s3://acct.r2.cloudflarestorage.com/bucket/key`). Otherwise it is a
*bucket* on the default endpoint (AWS_S3_ENDPOINT_URL, or AWS when unset). A bucket whose name has dots is
therefore written with three slashes: `s3:///my.bucket/key`. The default endpoint is AWS_S3_ENDPOINT_URL
(or AWS), the default bucket AWS_S3_DEFAULT_BUCKET, and a key that is empty or ends with `/` gets
`<normalized-id>.tar.zst` appended.

A request (with RUNTIME_DOWNLOADS=1) may also name places on this machine: a model directory, a configuration
directory (HF_MODEL_ID), a checkpoint file. Only inside MODELS_DIR and LOCAL_MODEL_ROOTS (`check_request_paths`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import InvalidInputs
from .builtin import is_builtin

if TYPE_CHECKING:
    from ..config import Settings
    from .spec import ModelSpec

ARCHIVE_SUFFIX = ".tar.zst"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def normalized_id(
    model_id: str, revision: str | None = None, variant: str | None = None, precision: str | None = None
) -> str:
    """`org/name`, revision `main`, precision `fp16` -> `models--org--name--main--fp16`."""
    parts = [_UNSAFE.sub("-", part) for part in model_id.strip("/").split("/") if part not in ("", ".", "..")]
    parts += [_UNSAFE.sub("-", extra) for extra in (revision, variant, precision) if extra]
    return "--".join(["models", *parts])


@dataclass(frozen=True)
class S3Location:
    endpoint_url: str | None  # None: AWS
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3 {self.endpoint_url or 'aws'} bucket {self.bucket} key {self.key}"


@dataclass(frozen=True)
class HTTPLocation:
    url: str

    def __str__(self) -> str:
        return self.url


ArchiveLocation = S3Location | HTTPLocation


def parse_model_url(url: str, model_key: str, settings: Settings) -> ArchiveLocation:
    """Where MODEL_URL points; `model_key` (`<normalized-id>.tar.zst`) fills in a missing key."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return HTTPLocation(url.strip())
    if scheme in ("http+s3", "https+s3"):
        if not parts.netloc:
            raise InvalidInputs(f"MODEL_URL {url!r}: {scheme}:// needs an endpoint host", field="model_url")
        endpoint = f"{scheme.removesuffix('+s3')}://{parts.netloc}"
        return _s3(endpoint, parts.path, model_key, settings, url)
    if scheme != "s3":
        raise InvalidInputs(
            f"MODEL_URL {url!r}: use s3://, http+s3://, https+s3://, http:// or https://", field="model_url"
        )
    if _looks_like_endpoint(parts.netloc):
        return _s3(f"https://{parts.netloc}", parts.path, model_key, settings, url)
    path = f"/{parts.netloc}{parts.path}" if parts.netloc else parts.path
    return _s3(settings.aws_s3_endpoint_url, path, model_key, settings, url)


def _looks_like_endpoint(host: str) -> bool:
    # Bucket names never hold a colon; dotted bucket names are written with three slashes (module docstring).
    return bool(host) and (":" in host or "." in host or host == "localhost")


def _s3(endpoint: str | None, path: str, model_key: str, settings: Settings, url: str) -> S3Location:
    bucket, _, key = path.lstrip("/").partition("/")
    bucket = bucket or (settings.aws_s3_default_bucket or "")
    if not bucket:
        raise InvalidInputs(
            f"MODEL_URL {url!r} names no bucket and AWS_S3_DEFAULT_BUCKET is not set", field="model_url"
        )
    if not key or key.endswith("/"):
        key += model_key
    return S3Location(endpoint_url=endpoint, bucket=bucket, key=key)


# --------------------------------------------------------------------------------------------- local paths

# (request field, ModelSpec attribute) of what may name a place on this machine
_PATH_FIELDS = (
    ("model", "model_id"),
    ("hf_model_id", "hf_model_id"),
    ("checkpoint_url", "checkpoint_url"),
    ("checkpoint_config_url", "checkpoint_config_url"),
)
_FILE_FIELDS = ("checkpoint_url", "checkpoint_config_url")


def check_request_paths(spec: ModelSpec, configured: ModelSpec | None, settings: Settings) -> None:
    """A request may name a place on this machine (a model or configuration directory, a checkpoint file) only
    inside MODELS_DIR and LOCAL_MODEL_ROOTS, links resolved, and this is checked before anything there is read:
    `..` or `/etc` would otherwise have the server walk a tree reading weight-file headers. What the
    configuration names is trusted, and so is a request naming the same."""
    roots = [Path(os.path.realpath(root)) for root in (settings.models_dir, *settings.local_model_roots)]
    for field, attribute in _PATH_FIELDS:
        value = getattr(spec, attribute)
        if value is None or (configured is not None and value == getattr(configured, attribute)):
            continue
        path = local_path(value, file=field in _FILE_FIELDS)
        if path is not None and not any(Path(os.path.realpath(path)).is_relative_to(root) for root in roots):
            raise InvalidInputs(
                f"{field} {value!r} is a path outside MODELS_DIR and LOCAL_MODEL_ROOTS, the directories a request "
                "may load from",
                field=field,
                setting="LOCAL_MODEL_ROOTS",
            )


def local_path(name: str, file: bool = False) -> Path | None:
    """The place on this machine `name` means, or None for a hub repo id, a builtin model or a URL. A `file`
    (a checkpoint) is a path unless it is a URL; a directory is one when it is absolute, starts with `~` or `.`,
    has a `..` part, or exists relative to the working directory (where loading would look for it)."""
    scheme = urlsplit(name).scheme
    if scheme == "file":
        return Path(urlsplit(name).path)
    if scheme or is_builtin(name):
        return None
    path = Path(name).expanduser()
    if file or path.is_absolute() or name.startswith((".", "~")) or ".." in path.parts or is_dir(path):
        return path
    return None


def is_dir(path: Path) -> bool:
    """`path.is_dir()`, but false where the name cannot be a directory: Path.is_dir raises for a name too long
    (ENAMETOOLONG), which a request's model id was (a 500)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False
