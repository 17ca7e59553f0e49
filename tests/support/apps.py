"""The app over a fake engine, in process: FastAPI's TestClient (tests/unit/conftest.py has the fixtures)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from diffusers_api.config import Settings
from diffusers_api.http.app import create_app

from .fakes import FakeEngine


def make_client(engine: FakeEngine, **settings: Any) -> TestClient:
    """A client of the app built for `Settings(**settings)` over `engine`; errors answer as they would live."""
    return TestClient(create_app(Settings(**settings), engine), raise_server_exceptions=False)
