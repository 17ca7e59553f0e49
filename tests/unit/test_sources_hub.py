"""`sources.cached_or_downloaded`: the hub fetch that the model, ControlNet and IP-Adapter sources share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from diffusers_api.errors import ModelMismatch, ModelNotFound, StorageError
from diffusers_api.models.sources import cached_or_downloaded


def _fetch(
    download: Callable[..., Path],
    refuse: Callable[[], None] = lambda: None,
    complete: Callable[[Path], bool] = lambda directory: True,
    timings: dict[str, float] | None = None,
) -> Path:
    return cached_or_downloaded(
        download,
        refuse=refuse,
        timings=timings,
        name="thing x",
        requested="x",
        not_found=lambda exc: f"x is missing: {exc}",
        complete=complete,
    )


def test_a_complete_copy_on_disk_is_used_without_a_download(tmp_path: Path) -> None:
    calls: list[bool] = []

    def download(*, local_files_only: bool) -> Path:
        calls.append(local_files_only)
        return tmp_path

    def refuse() -> None:
        raise AssertionError("no download needed")

    assert _fetch(download, refuse) == tmp_path
    assert calls == [True]


def test_an_incomplete_or_missing_copy_is_downloaded_and_timed(tmp_path: Path) -> None:
    calls: list[bool] = []

    def download(*, local_files_only: bool) -> Path:
        calls.append(local_files_only)
        return tmp_path / ("cached" if local_files_only else "fetched")

    timings: dict[str, float] = {}
    assert _fetch(download, complete=lambda directory: directory.name != "cached", timings=timings).name == "fetched"
    assert calls == [True, False]
    assert "download" in timings

    def missing(*, local_files_only: bool) -> Path:
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        return tmp_path

    assert _fetch(missing) == tmp_path


def test_refusal_not_found_and_failure(tmp_path: Path) -> None:
    def missing(*, local_files_only: bool) -> Path:
        raise FileNotFoundError("nothing there")

    def refuse() -> None:
        raise ModelMismatch("OFFLINE=1")

    with pytest.raises(ModelMismatch, match="OFFLINE=1"):
        _fetch(missing, refuse)
    with pytest.raises(ModelNotFound, match="x is missing: nothing there"):
        _fetch(missing)

    def broken(*, local_files_only: bool) -> Path:
        raise OSError("disk full")

    with pytest.raises(StorageError, match="hub download of thing x failed: disk full"):
        _fetch(broken)
