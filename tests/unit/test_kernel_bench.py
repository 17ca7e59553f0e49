"""bench/kernel_bench.py on the CPU: its --tiny path is the GPU run's code on the tiny models, in seconds (2 steps,
one timed call); the variants a CPU cannot run are skipped with their reason."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel_bench.py"
FAST = ["--tiny", "--steps", "2", "--warmup", "1", "--runs-w", "1", "--runs-sdxl", "1"]


@pytest.fixture(scope="module")
def kernel_bench() -> Iterator[ModuleType]:
    """bench/ is no package: the script, imported from its file (registered first, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location("kernel_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_bench"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["kernel_bench"]


def run(kernel_bench: ModuleType, out: Path, *extra: str) -> dict[tuple[str, str], dict[str, Any]]:
    kernel_bench.main([*FAST, "--out", str(out), *extra])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[-1]["what"] == "kernel_summary"
    return {(r["workload"], r["variant"]): r for r in records if r["what"] == "kernel"}


@pytest.mark.timeout(120)
def test_tiny_run_measures_w_then_sdxl_against_the_baseline(kernel_bench: ModuleType, tmp_path: Path) -> None:
    results = run(kernel_bench, tmp_path / "kernel.jsonl")
    assert [key for key in results if key[1] == "build"] == [("W", "build"), ("SDXL", "build")]
    for workload in ("W", "SDXL"):
        baseline, flash = results[workload, "baseline"], results[workload, "flash"]
        assert baseline["status"] == "ok", baseline
        assert baseline["speedup"] == 1.0
        # the same seed twice on a CPU: the baseline's noise floor is nothing
        assert baseline["image_diff"]["max_abs"] == 0
        assert baseline["image_diff"]["psnr_db"] is None
        # CPUs have a flash kernel: the UNet's attention forced onto it runs
        assert flash["status"] == "ok", flash
        assert flash["settings"] == {"sdpa": "flash"}
        assert len(flash["times_s"]) == 1
        assert flash["median_s"] == flash["min_s"] == flash["times_s"][0]
        assert flash["speedup"] == pytest.approx(baseline["median_s"] / flash["median_s"], rel=0.01)
        assert flash["image_diff"]["max_abs"] <= 1, flash["image_diff"]
        for name in ("cudnn", "efficient", "fp8", "fp8_sdpa"):
            assert results[workload, name]["status"] == "skipped"
            assert "CUDA" in results[workload, name]["reason"]
    assert results["W", "baseline"]["env"]["torch"]


@contextmanager
def refusing_backend() -> Any:
    raise RuntimeError("No available kernel. Aborting execution.")
    yield  # a generator, like forced_sdpa


@pytest.mark.timeout(120)
def test_a_failing_variant_is_an_error_line_and_the_others_still_run(
    kernel_bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_bench, "forced_sdpa", lambda unet, name: refusing_backend())
    results = run(kernel_bench, tmp_path / "kernel.jsonl", "--skip-sdxl", "--variants", "flash,baseline")
    assert results["W", "flash"]["status"] == "error"
    assert "No available kernel" in results["W", "flash"]["error"]
    # the baseline runs first whatever the order asked for, and the failure did not take it down
    assert list(results) == [("W", "build"), ("W", "baseline"), ("W", "flash")]
    assert results["W", "baseline"]["status"] == "ok"


def test_variants_past_the_budget_are_skipped_without_building(kernel_bench: ModuleType, tmp_path: Path) -> None:
    results = run(kernel_bench, tmp_path / "kernel.jsonl", "--budget-s", "0")
    assert ("W", "build") not in results
    assert len(results) == 2 * len(kernel_bench.EAGER_VARIANTS)
    for record in results.values():
        assert record["status"] == "skipped"
        assert "--budget-s 0" in record["reason"]


def test_time_limit_stops_a_runaway_variant_and_sets_an_earlier_alarm_again(kernel_bench: ModuleType) -> None:
    fired: list[int] = []
    previous_handler = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, 30)  # stands for pytest-timeout's alarm
    try:
        with pytest.raises(kernel_bench.VariantTimeout, match="time limit"), kernel_bench.time_limit(0.05):
            time.sleep(5)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < remaining <= 30
        assert not fired
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        signal.setitimer(signal.ITIMER_REAL, previous_delay)


def test_image_difference_in_8_bit_levels(kernel_bench: ModuleType) -> None:
    reference = np.zeros((1, 4, 4, 3), dtype=np.float32)
    image = reference.copy()
    image[0, 0, 0, 0] = 10 / 255  # one value 10 levels off, of 48
    image[0, 1, 0, 0] = 1 / 255  # and one a single level off
    diff = kernel_bench.image_difference(image, reference)
    assert diff["max_abs"] == 10
    assert diff["mean_abs"] == pytest.approx(11 / 48, abs=1e-4)
    assert diff["psnr_db"] == pytest.approx(10 * np.log10(255**2 / (101 / 48)), abs=0.01)
    assert diff["share_over_1_level"] == pytest.approx(1 / 48, abs=1e-6)
    assert diff["nan_values"] == 0


def test_unknown_variants_are_refused_by_name(kernel_bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        kernel_bench.parse(["--variants", "flash,warp"])
    assert "unknown variant(s) warp" in capsys.readouterr().err
