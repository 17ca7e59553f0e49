"""`make install`'s torch step, dry-run (`make -n`) against a stand-in virtualenv: it runs again when TORCH or
TORCH_INDEX changes after an install, and a machine with neither the wheel nor a GPU gets PyTorch's CPU build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A virtualenv as `make install` leaves it after installing torch==2.13.0 from the default place."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    stamp, installed = venv / ".torch-torch__2.13.0", venv / "bin" / "diffusers-api"
    edited = (ROOT / "pyproject.toml").stat().st_mtime
    for path, when in ((stamp, edited + 10), (installed, edited + 20)):  # torch, then the package, after the edit
        path.touch()
        os.utime(path, (when, when))
    return venv


def dry_run(venv: Path, *assignments: str) -> str:
    done = subprocess.run(
        ["make", "-n", "install", f"VENV={venv}", "nvidia_gpu=", *assignments],  # nvidia_gpu=: as without a GPU
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_same_torch_is_not_installed_again(venv: Path) -> None:
    assert "pip install" not in dry_run(venv, "TORCH=torch==2.13.0")


def test_another_torch_is_installed_after_a_first_install(venv: Path) -> None:
    out = dry_run(venv, "TORCH=torch==0.0.1")  # no machine carries this wheel: the CPU index it is
    assert f'pip install --quiet --index-url {CPU_INDEX} "torch==0.0.1"' in out
    assert 'pip install --quiet -e ".[dev]"' in out
    assert f"touch {venv}/.torch-torch__0.0.1" in out


def test_another_index_for_the_same_version_reinstalls_it(venv: Path) -> None:
    cuda = "https://download.pytorch.org/whl/cu128"
    out = dry_run(venv, "TORCH=torch==2.13.0", f"TORCH_INDEX={cuda}")
    assert f'pip install --quiet --index-url {cuda} "torch==2.13.0"' in out
    assert f"touch {venv}/.torch-torch__2.13.0@https___download.pytorch.org_whl_cu128" in out
