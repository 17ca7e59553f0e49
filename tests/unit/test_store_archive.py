"""Archives: round trip as streams, corruption detected, and nothing written outside the target."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from diffusers_api.models import archive
from diffusers_api.models.archive import CorruptArchive


def make_tree(root: Path) -> None:
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "X"}')
    (root / "unet" / "weights.safetensors").write_bytes(os.urandom(300_000))


def tar_zst(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def test_round_trip_is_byte_identical(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    make_tree(source)
    packed = io.BytesIO()
    archive.pack(source, packed)
    target.mkdir()
    archive.unpack(io.BytesIO(packed.getvalue()), target)
    for name in ("model_index.json", "unet/weights.safetensors"):
        assert (target / name).read_bytes() == (source / name).read_bytes()


def test_links_are_packed_as_the_files_they_point_to(tmp_path: Path) -> None:
    # A hub snapshot is a tree of links into a blob store.
    source, target = tmp_path / "source", tmp_path / "target"
    make_tree(source)
    (tmp_path / "blob").write_bytes(b"weights")
    (source / "linked.safetensors").symlink_to(tmp_path / "blob")
    packed = io.BytesIO()
    archive.pack(source, packed)
    target.mkdir()
    archive.unpack(io.BytesIO(packed.getvalue()), target)
    assert not (target / "linked.safetensors").is_symlink()
    assert (target / "linked.safetensors").read_bytes() == b"weights"


def test_a_flipped_byte_is_detected(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_tree(source)
    packed = io.BytesIO()
    archive.pack(source, packed)
    data = bytearray(packed.getvalue())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "target").mkdir()
    with pytest.raises(CorruptArchive):
        archive.unpack(io.BytesIO(bytes(data)), tmp_path / "target")


def test_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(CorruptArchive, match="corrupt model archive"):
        archive.unpack(io.BytesIO(b"this is not zstd at all"), tmp_path)


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "member",
    [
        _file("../escaped.txt"),
        _file("/tmp/absolute.txt"),
        _file("a/../../escaped.txt"),
        _link("evil", "/etc/passwd", tarfile.SYMTYPE),
        _link("hard", "/etc/passwd", tarfile.LNKTYPE),
    ],
    ids=["dot-dot", "absolute", "nested-dot-dot", "symlink", "hardlink"],
)
def test_unsafe_members_are_refused(tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None]) -> None:
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    with pytest.raises(CorruptArchive, match=r"outside its directory|not a regular file"):
        archive.unpack(io.BytesIO(tar_zst([member])), target)
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert not (target / "evil").exists()
