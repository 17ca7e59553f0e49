"""Cloud-cache archives: a `save_pretrained` directory as a zstd-compressed tar, packed and unpacked as streams.

Nothing is held in memory whole: tar writes into a zstd compressor that writes into the destination file, and
unpacking reads the other way. zstd frames carry a content checksum, so a corrupted archive fails loudly.
Unpacking accepts only regular files and directories whose paths stay inside the target: no links, devices,
absolute paths or `..` (an archive is data from elsewhere, and must not write outside its directory).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Protocol, cast

from ..errors import StorageError

# Level 3 is zstd's default: fast enough to pack at disk speed; safetensors weights barely compress anyway.
ZSTD_LEVEL = 3
COPY_CHUNK = 1024 * 1024


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class CorruptArchive(StorageError):
    """The archive is not a valid .tar.zst of a model directory, or tries to write outside it."""


def pack(directory: Path, out: Writable, level: int = ZSTD_LEVEL) -> None:
    """Write `directory`'s files (sorted, links followed to their files) into `out` as .tar.zst."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=-1)
    # zstandard accepts any object with write(); its stubs say IO[bytes].
    with (
        compressor.stream_writer(cast("IO[bytes]", out), closefd=False) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT, dereference=True) as tar,
    ):
        for path in sorted(directory.rglob("*")):
            # dereference: a hub snapshot is a tree of links into its blob store; the archive holds the files.
            if path.is_file():
                tar.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)


def unpack(source: BinaryIO, directory: Path) -> None:
    """Extract a .tar.zst stream into the existing, empty `directory`; CorruptArchive on anything unsafe."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    try:
        with (
            decompressor.stream_reader(source, closefd=False) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            for member in tar:
                _extract(tar, member, directory)
            # tar stops at its end marker; read on to the end of the zstd frame, whose checksum covers it all.
            while stream.read(COPY_CHUNK):
                pass
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise CorruptArchive(f"corrupt model archive: {type(exc).__name__}: {exc}") from exc


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, directory: Path) -> None:
    target = directory / _safe_relative(member.name)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    if not member.isfile():
        raise CorruptArchive(f"model archive holds {member.name!r}, which is not a regular file")
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = tar.extractfile(member)
    if reader is None:
        raise CorruptArchive(f"model archive: cannot read {member.name!r}")
    with reader, target.open("wb") as out:
        shutil.copyfileobj(reader, out, COPY_CHUNK)
        written = out.tell()
    if written != member.size:
        raise CorruptArchive(f"model archive: {member.name!r} is truncated")


def _safe_relative(name: str) -> Path:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in name:
        raise CorruptArchive(f"model archive holds {name!r}, a path outside its directory")
    return Path(*path.parts)


def directory_bytes(directory: Path) -> int:
    """Size of the files under `directory` (links followed), for logs and the memory estimate."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def fsync_tree(directory: Path) -> None:
    """Flush unpacked files to disk before the directory is published under its final name."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
