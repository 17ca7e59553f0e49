"""Moving bytes: S3-compatible storage (boto3) and plain HTTP(S) (httpx), with timeouts, retries and checks.

Every transfer writes to a path its caller chose (a temporary one), verifies what it knows (size always, the
SHA-256 that uploads store in the object's metadata), and raises `StorageError` when the far side fails. A
missing object is `Missing`, so that the cloud cache can build and upload it instead. Progress bars appear
only on a terminal; logs get one line per transfer.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputs, StorageError

if TYPE_CHECKING:
    from ..config import Settings
    from .locations import HTTPLocation, S3Location

log = logging.getLogger(__name__)

ATTEMPTS = 4
BACKOFF_S = 0.5  # doubles after each failed attempt
# Multipart above this size: parts upload in parallel and a failed part is retried alone.
MULTIPART_BYTES = 64 * 1024 * 1024
SHA256_METADATA = "sha256"


class Missing(Exception):
    """The object or URL does not exist (404): not an error for the cloud cache, which then builds it."""


class Truncated(Exception):
    """A transfer ended before its announced size: retried, resuming where the source allows."""


def progress_bar(total: int | None, description: str) -> Any:
    from tqdm import tqdm

    # On a terminal only: in logs a bar is noise, and a line per transfer is logged instead.
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, disable=not sys.stderr.isatty())


def download(location: S3Location | HTTPLocation, dest: Path, settings: Settings) -> None:
    """Download a parsed MODEL_URL-style location (an S3 object or an http(s) URL) into `dest`."""
    from .locations import S3Location

    if isinstance(location, S3Location):
        s3_download(location, dest, settings)
    else:
        http_download(location.url, dest, settings)


# --------------------------------------------------------------------------------------------- HTTP


def http_download(url: str, dest: Path, settings: Settings, max_bytes: int | None = None) -> None:
    """GET `url` into `dest`, retrying with backoff and resuming with a Range request where the server can.
    With `max_bytes`, a larger file is refused (InvalidInputs) as soon as its size is announced or reached."""
    from ..outbound import check_public_url

    check_public_url(url, settings.allow_private_urls, "download URL")  # refused before anything is written
    started = time.perf_counter()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _http_attempt(url, dest, settings, max_bytes)
            break
        except (Truncated, _Retryable) as exc:
            if attempt == ATTEMPTS:
                raise StorageError(f"download of {url} failed after {ATTEMPTS} attempts: {exc}") from exc
            log.warning("download of %s failed (%s); retrying", url, exc)
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    log.info("downloaded %s (%d bytes) in %.1f s", url, dest.stat().st_size, time.perf_counter() - started)


class _Retryable(Exception):
    pass


def _http_attempt(url: str, dest: Path, settings: Settings, max_bytes: int | None) -> None:
    import httpx

    from ..outbound import http_client

    have = dest.stat().st_size if dest.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    timeout = httpx.Timeout(settings.download_timeout_s)
    try:
        with (
            # guarded: the connection (and that of every redirect) goes to an address checked as public
            http_client(
                not settings.allow_private_urls, "download URL", timeout=timeout, follow_redirects=True
            ) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            total = _expected_size(response, have, url)
            if max_bytes is not None and total is not None and total > max_bytes:
                raise _too_large(url, max_bytes)
            resume = response.status_code == 206
            _write_body(response, dest, append=resume, total=total, max_bytes=max_bytes, url=url)
    except httpx.TransportError as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
    if total is not None and dest.stat().st_size != total:
        raise Truncated(f"got {dest.stat().st_size} of {total} bytes")


def _expected_size(response: Any, have: int, url: str) -> int | None:
    status = response.status_code
    if status == 404:
        raise Missing(url)
    if status >= 500 or status == 429:
        raise _Retryable(f"HTTP {status}")
    if status not in (200, 206):
        raise StorageError(f"download of {url} failed: HTTP {status}", status_code=status)
    length = response.headers.get("content-length")
    if length is None:
        return None
    return int(length) + (have if status == 206 else 0)


def _write_body(response: Any, dest: Path, *, append: bool, total: int | None, max_bytes: int | None, url: str) -> None:
    with dest.open("ab" if append else "wb") as out, progress_bar(total, dest.name) as bar:
        bar.update(out.tell())
        # No chunk size: each piece is written as it arrives, so a broken connection loses nothing received.
        for chunk in response.iter_bytes():
            out.write(chunk)
            bar.update(len(chunk))
            if max_bytes is not None and out.tell() > max_bytes:  # no or a false Content-Length
                raise _too_large(url, max_bytes)


def _too_large(url: str, max_bytes: int) -> InvalidInputs:
    return InvalidInputs(f"{url} is larger than the {max_bytes} bytes allowed", max_bytes=max_bytes)


# --------------------------------------------------------------------------------------------- S3


def s3_client(endpoint_url: str | None, settings: Settings) -> Any:
    """A boto3 S3 client. An endpoint named by a MODEL_URL (not AWS_S3_ENDPOINT_URL, which the operator set) is
    checked like any URL a request may bring. boto3 resolves it again when it connects, so unlike HTTP downloads
    this check cannot rule out DNS rebinding: it stops a URL that names a private address outright."""
    import boto3
    from botocore.config import Config

    from ..outbound import check_public_url

    if endpoint_url is not None and endpoint_url != settings.aws_s3_endpoint_url:
        check_public_url(endpoint_url, settings.allow_private_urls, "S3 endpoint")

    secret = settings.aws_secret_access_key
    key_id = settings.aws_access_key_id
    config = Config(
        connect_timeout=settings.download_timeout_s,
        read_timeout=settings.download_timeout_s,
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},  # botocore's backoff with jitter
        signature_version="s3v4",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=settings.aws_default_region or "us-east-1",
        aws_access_key_id=key_id.get_secret_value() if key_id else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=config,
    )


def s3_download(location: S3Location, dest: Path, settings: Settings) -> None:
    """Download the object into `dest`; verify its size and, where the uploader stored one, its SHA-256."""
    from boto3.s3.transfer import TransferConfig

    from .disk import sha256_of

    client = s3_client(location.endpoint_url, settings)
    head = _s3_call(location, lambda: client.head_object(Bucket=location.bucket, Key=location.key))
    size = int(head["ContentLength"])
    config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
    started = time.perf_counter()
    with dest.open("wb") as out, progress_bar(size, location.key) as bar:
        _s3_call(
            location,
            lambda: client.download_fileobj(location.bucket, location.key, out, Config=config, Callback=bar.update),
        )
    if dest.stat().st_size != size:
        raise StorageError(f"download of {location} is truncated: {dest.stat().st_size} of {size} bytes")
    expected = head.get("Metadata", {}).get(SHA256_METADATA)
    if expected and sha256_of(dest) != expected:
        raise StorageError(f"download of {location} is corrupt: SHA-256 does not match the uploaded one")
    log.info("downloaded %s (%d bytes) in %.1f s", location, size, time.perf_counter() - started)


def s3_upload(location: S3Location, source: Path, sha256: str, settings: Settings) -> None:
    """Upload `source` (multipart when large); S3 publishes an object only once it is complete."""
    from boto3.s3.transfer import TransferConfig

    client = s3_client(location.endpoint_url, settings)
    config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
    size = source.stat().st_size
    started = time.perf_counter()
    with progress_bar(size, f"upload {location.key}") as bar:
        _s3_call(
            location,
            lambda: client.upload_file(
                str(source),
                location.bucket,
                location.key,
                ExtraArgs={"Metadata": {SHA256_METADATA: sha256}},
                Config=config,
                Callback=bar.update,
            ),
        )
    log.info("uploaded %s (%d bytes) in %.1f s", location, size, time.perf_counter() - started)


def _s3_call(location: S3Location, call: Any) -> Any:
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise Missing(str(location)) from exc
        raise StorageError(f"S3 request for {location} failed: {code or exc}", s3_code=code) from exc
    except (BotoCoreError, S3TransferFailedError, S3UploadFailedError, OSError) as exc:
        raise StorageError(f"S3 request for {location} failed: {type(exc).__name__}: {exc}") from exc
