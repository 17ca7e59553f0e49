"""Shared fixtures: one models directory per test session, so each tiny model is generated once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: a hub lookup must fail fast instead of waiting on a closed network.
# huggingface_hub reads this once, at import, so it is set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
# One CPU thread for torch, here and in the servers the e2e tests start (they inherit this environment); set
# before anything imports torch, which reads it once. Its thread pool spins: on this project's 2-core machines,
# with other work on the cores, two threads made the tiny models' steps several times slower than one
# (side by side: test_denoise.py 91 s against 23 s, test_batching.py 52 s against 25 s). A value set outside stands.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")
