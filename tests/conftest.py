"""Shared fixtures: one models directory per test session, so each tiny model is generated once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: a hub lookup must fail fast instead of waiting on a closed network.
# huggingface_hub reads this once, at import, so it is set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")
