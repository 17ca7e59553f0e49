"""What every part of the client shares: the envelope type, the error, and the settings from the environment."""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Envelope = dict[str, Any]
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


class ClientError(Exception):
    """A request that did not produce images: the server's error, a failed job, or a timeout."""


class ClientSettings(BaseSettings):
    """Where the client sends requests, from the environment (flags override)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True)

    test_url: str = "http://localhost:8000/"  # server for plain requests
    runpod_base_url: str = "https://api.runpod.ai/v2"  # RunPod's API, or a local stand-in
    runpod_endpoint_id: str | None = None
    runpod_api_key: SecretStr | None = None
