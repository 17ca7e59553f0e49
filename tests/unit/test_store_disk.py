"""The models directory: staging, atomic publishing and what a killed process leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusers_api.errors import StorageError
from diffusers_api.models import disk
from diffusers_api.models.sizes import estimate_bytes
from diffusers_api.models.store import cached_models


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


def make_old(path: Path) -> None:
    old = time.time() - disk.STALE_AFTER_S - 60
    os.utime(path, (old, old))


def test_a_start_removes_stale_staging_of_a_killed_build(tmp_path: Path) -> None:
    from diffusers_api.config import Settings
    from diffusers_api.runner import Runner

    orphan = tmp_path / f"{disk.STAGING_PREFIX}models--org--name-0123456789abcdef"
    (orphan / "unet").mkdir(parents=True)
    recent = tmp_path / f"{disk.STAGING_PREFIX}models--org--other-fedcba9876543210"
    recent.mkdir()
    not_ours = tmp_path / ".cache-of-something-else"
    not_ours.mkdir()
    make_old(orphan)
    make_old(not_ours)
    Runner(Settings(models_dir=tmp_path, runtime_downloads=True)).start()  # no model to load: only the clean-up
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, not_ours.name])


def test_staging_a_live_process_holds_stays_however_old(tmp_path: Path) -> None:
    with disk.staged_directory(tmp_path / "models--org--name") as staging:
        make_old(staging)
        disk.remove_stale(tmp_path)
        assert staging.is_dir()
    assert list(tmp_path.iterdir()) == []


def test_staging_of_a_process_that_was_killed_is_removed(tmp_path: Path) -> None:
    """The lock goes with the process, whatever killed it (SIGKILL here, as an OOM kill or `docker kill`)."""
    build = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from diffusers_api.models import disk\n"
        "with disk.staged_directory(Path(sys.argv[1]) / 'models--org--name') as staging:\n"
        "    print(staging, flush=True)\n"
        "    time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", build, str(tmp_path)], stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            staging = Path(process.stdout.readline().strip())
            make_old(staging)
            disk.remove_stale(tmp_path)
            assert staging.is_dir(), "removed while its process was alive"
        finally:
            process.kill()
    disk.remove_stale(tmp_path)
    assert not staging.exists()
