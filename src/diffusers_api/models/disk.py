"""The models directory on disk: staging, atomic publishing, temporary files, and clean-up after crashes.

Everything that becomes a model directory is written under a dot-prefixed staging name beside its final name
(same filesystem), then published with one `rename`. A directory under a final name is therefore complete; a
killed download or unpack leaves only dot-prefixed leftovers, which nothing loads and `remove_stale` clears (at
every start, and before each download): those older than STALE_AFTER_S that no live process holds. A process
holds its staging directory with a lock (`flock`), which the kernel drops when the process ends, however it
ends; where the filesystem has no such locks, the age alone tells.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from ..errors import StorageError

# Dot-prefixed, so that nothing listing the models directory takes them for models.
STAGING_PREFIX = ".staging-"
DISCARD_PREFIX = ".discard-"
DOWNLOAD_PREFIX = ".download-"
# A leftover this old belongs to a process that died (a live transfer touches its file continuously).
STALE_AFTER_S = 15 * 60


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh staging directory beside `target`; publish it with `publish`. Removed if still there at exit."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would be published with the model.
    staging = target.with_name(f"{STAGING_PREFIX}{target.name}-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        with held(staging):
            yield staging
    finally:
        remove(staging)


@contextmanager
def held(directory: Path) -> Iterator[None]:
    """A shared lock on `directory` while the block runs, so that `remove_stale` in another process leaves it
    alone however long the build takes (a checkpoint's conversion can outlast STALE_AFTER_S)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with suppress(OSError):  # a filesystem without locks: the age alone tells
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # drops the lock; after a publish the lock was on the published directory, which is fine


def in_use(path: Path) -> bool:
    """Whether a live process holds `path` (see `held`). False when nothing holds it or locks cannot tell."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the lock just taken
    return False


def publish(
    staging: Path, target: Path, complete: Callable[[Path], bool] | None = None, replace_others: bool = False
) -> None:
    """Rename `staging` onto `target`, atomically. If another process published a complete copy first (`complete`,
    by default `is_published`), its copy is kept. Whatever else stands at `target` is an error, unless
    `replace_others`: then it is moved aside and removed (never a complete copy, even one published meanwhile)."""
    complete = complete or is_published
    for _ in range(3):
        try:
            os.rename(staging, target)  # replaces only an empty directory
            return
        except OSError as exc:
            if complete(target):
                return
            if not replace_others:
                raise StorageError(f"cannot publish the model at {target}: {exc}; is something else there?") from exc
            _move_aside(target, complete)
    raise StorageError(f"cannot publish the model at {target}: other processes keep writing there")


def _move_aside(target: Path, complete: Callable[[Path], bool]) -> None:
    """Move an incomplete or outdated `target` out of the way and remove it, without ever deleting a complete one."""
    aside = target.with_name(f"{DISCARD_PREFIX}{target.name}-{uuid.uuid4().hex}")
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        return
    # Another process may have published between our check and the rename: put its work back.
    if complete(aside):
        with suppress(OSError):
            os.rename(aside, target)
            return
    remove(aside)


def is_published(directory: Path) -> bool:
    """A published diffusers directory (only a complete one ever gets its final name)."""
    return (directory / "model_index.json").is_file()


@contextmanager
def temporary_file(directory: Path, name: str) -> Iterator[Path]:
    """A dot-prefixed path in `directory` for a transfer; deleted at exit whatever happened."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{DOWNLOAD_PREFIX}{uuid.uuid4().hex}-{name}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def remove_stale(models_dir: Path) -> None:
    """Remove what killed processes left behind: staging directories, discards and partial downloads older than
    STALE_AFTER_S that no live process holds. Only names of these prefixes, which only this server makes."""
    if not models_dir.is_dir():
        return
    now = time.time()
    for path in models_dir.iterdir():
        if not path.name.startswith((STAGING_PREFIX, DISCARD_PREFIX, DOWNLOAD_PREFIX)):
            continue
        with suppress(OSError):
            if now - path.stat().st_mtime > STALE_AFTER_S and not in_use(path):
                remove(path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """Writes through to `out` while hashing and counting, so a packed archive is hashed as it is written."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()
