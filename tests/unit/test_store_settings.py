"""The model-store settings: MODEL_MEMORY_BUDGET sizes, OFFLINE, and the opt-ins."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from diffusers_api.config import Settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1500000", 1_500_000),
        ("12GB", 12 * 10**9),
        ("8GiB", 8 * 2**30),
        ("1.5 gb", 1_500_000_000),
        ("500MiB", 500 * 2**20),
    ],
)
def test_memory_budget_sizes(monkeypatch: pytest.MonkeyPatch, text: str, expected: int) -> None:
    monkeypatch.setenv("MODEL_MEMORY_BUDGET", text)
    assert Settings().model_memory_budget == expected


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-1GB"])
def test_bad_memory_budget_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="not a size"):
        Settings(model_memory_budget=text)


def test_store_switches_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OFFLINE", "ALLOW_PICKLE", "ALLOW_PRIVATE_URLS"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("DOWNLOAD_TIMEOUT_S", "5")
    settings = Settings()
    assert (settings.offline, settings.allow_pickle, settings.allow_private_urls) == (True, True, True)
    assert settings.download_timeout_s == 5


def test_no_budget_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_MEMORY_BUDGET", raising=False)
    assert Settings().model_memory_budget is None
