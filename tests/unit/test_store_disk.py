"""The models directory: staging, atomic publishing and what a killed process leaves behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from diffusers_api.errors import StorageError
from diffusers_api.models import disk
from diffusers_api.models.store import cached_models, estimate_bytes


def test_a_staged_directory_is_published_whole(tmp_path: Path) -> None:
    target = tmp_path / "models--org--name"
    with disk.staged_directory(target) as staging:
        (staging / "model_index.json").write_text("{}")
        assert not target.exists()
        disk.publish(staging, target)
    assert disk.is_published(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models--org--name"]


def build_then_fail(target: Path) -> None:
    with disk.staged_directory(target) as staging:
        (staging / "model_index.json").write_text("{}")
        raise RuntimeError("killed half-way")


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        build_then_fail(tmp_path / "models--org--name")
    assert list(tmp_path.iterdir()) == []


def test_the_first_publisher_wins(tmp_path: Path) -> None:
    target = tmp_path / "models--org--name"
    for content in ("first", "second"):
        with disk.staged_directory(target) as staging:
            (staging / "model_index.json").write_text(content)
            disk.publish(staging, target)
    assert (target / "model_index.json").read_text() == "first"


def test_something_else_in_the_way_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "models--org--name"
    target.mkdir()
    (target / "stray.txt").write_text("not a model")
    with disk.staged_directory(target) as staging:
        (staging / "model_index.json").write_text("{}")
        with pytest.raises(StorageError, match="cannot publish"):
            disk.publish(staging, target)


def test_leftovers_of_killed_processes_are_never_listed_and_are_cleaned_when_stale(tmp_path: Path) -> None:
    stale_staging = tmp_path / ".staging-models--org--name-1234"
    stale_staging.mkdir()
    (stale_staging / "model_index.json").write_text("{}")
    partial = tmp_path / ".download-1234-model.tar.zst"
    partial.write_bytes(b"half")
    fresh = tmp_path / ".download-5678-other.tar.zst"
    fresh.write_bytes(b"in progress")
    old = time.time() - disk.STALE_AFTER_S - 60
    for path in (stale_staging, partial):
        os.utime(path, (old, old))
    assert cached_models(tmp_path) == []
    disk.remove_stale(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]


def test_memory_estimate_reads_safetensors_headers_in_the_target_precision(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "unet").mkdir()
    tensors = {"weight": torch.zeros(10, dtype=torch.float32), "index": torch.zeros(2, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "unet" / "model.safetensors"))
    (tmp_path / "unet" / "config.json").write_text("{}" * 1000)  # not weights
    assert estimate_bytes(tmp_path) == 10 * 4 + 2 * 8
    assert estimate_bytes(tmp_path, "fp16") == 10 * 2 + 2 * 8  # floats cast, integers kept
