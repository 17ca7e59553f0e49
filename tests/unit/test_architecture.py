"""The import rules of docs/architecture.md (the contracts in pyproject.toml), checked by import-linter."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import diffusers_api

ROOT = Path(__file__).resolve().parents[2]


def test_layers_import_only_downwards() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None, "import-linter is a dev dependency: make install"
    done = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_module_has_a_layer() -> None:
    """A module outside the layers would escape the contract: each top-level module or package must be in one."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(contract for contract in contracts if contract["type"] == "layers")["layers"]
    placed = {
        name.strip().removeprefix("diffusers_api.") for layer in layers for name in layer.replace(":", "|").split("|")
    }
    package = Path(diffusers_api.__file__).parent
    modules = {path.stem for path in package.glob("*.py")} | {
        path.parent.name for path in package.glob("*/__init__.py")
    }
    assert modules - {"__init__", "__main__"} - placed == set()
