"""Settings: environment names of the original, flags over environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from diffusers_api.config import Settings, default_models_dir


def test_environment_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_ID", "builtin/tiny-sd")
    monkeypatch.setenv("RUNTIME_DOWNLOADS", "1")
    monkeypatch.setenv("CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("MODEL_PRECISION", "float16")
    settings = Settings()
    assert settings.model_id == "builtin/tiny-sd"
    assert settings.runtime_downloads is True
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.hf_auth_token is not None
    assert settings.hf_auth_token.get_secret_value() == "hf_secret"
    assert settings.model_precision == "fp16"


def test_new_limits_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_MODEL_ROOTS", "/data/models, ~/more")
    monkeypatch.setenv("MAX_PROMPT_CHARS", "500")
    monkeypatch.setenv("UPSCALE_TILE", "256")
    settings = Settings()
    assert settings.local_model_roots == [Path("/data/models"), Path("~/more").expanduser()]
    assert settings.max_prompt_chars == 500
    assert settings.upscale_tile == 256


def test_fill_mode_and_checkpoint_config_url_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILL_MODE", "PatchMatch")
    monkeypatch.setenv("CHECKPOINT_CONFIG_URL", "https://example.com/v1-inference.yaml")
    settings = Settings()
    assert (settings.fill_mode, settings.checkpoint_config_url) == (
        "patchmatch",
        "https://example.com/v1-inference.yaml",
    )
    assert Settings(_env_file=None, fill_mode="none").fill_mode == "none"
    with pytest.raises(ValidationError, match="fill_mode"):
        Settings(fill_mode="blur")


def test_init_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    assert Settings(port=1234).port == 1234


def test_models_dir_expands_home() -> None:
    assert Settings(models_dir="~/x").models_dir == Path("~/x").expanduser()


def test_secrets_are_not_printed() -> None:
    settings = Settings(api_key="topsecret")
    assert "topsecret" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"), [("port", 0), ("model_precision", "fp8"), ("max_batch_size", 0), ("upscale_tile", -1)]
)
def test_invalid_values_are_refused(name: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{name: value})


def test_empty_environment_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_ID", "")
    assert Settings().model_id is None


def test_models_live_on_the_runpod_volume_when_one_is_mounted(tmp_path: Path) -> None:
    assert default_models_dir(volume=tmp_path) == tmp_path / "diffusers-api"
    assert default_models_dir(volume=tmp_path / "absent") == Path("~/.cache/diffusers-api").expanduser()


def test_container_id_comes_from_runpod_else_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTAINER_ID", raising=False)
    monkeypatch.setenv("RUNPOD_POD_ID", "pod-123")
    assert Settings().container_id == "pod-123"
    monkeypatch.delenv("RUNPOD_POD_ID")
    import socket

    assert Settings().container_id == socket.gethostname()
