"""The cloud cache against a real S3-compatible server (moto, over HTTP on loopback) and a plain HTTP server."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from diffusers_api.config import Settings
from diffusers_api.engine import SerialEngine
from diffusers_api.errors import InvalidInputs, ModelNotFound, StorageError
from diffusers_api.http.app import create_app
from diffusers_api.models import archive, builtin
from diffusers_api.models.builtin import ensure_builtin
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest
from support.ldm import ldm_state_dict
from support.servers import ACCESS_KEY, REGION, SECRET_KEY, FileServer, file_server, free_port, moto_s3, s3_client

BUCKET = "models"
TINY = "builtin/tiny-sd"
TINY_KEY = "models--builtin--tiny-sd.tar.zst"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def files() -> Iterator[FileServer]:
    with file_server() as server:
        yield server


@pytest.fixture(scope="module")
def tiny_archive(models_dir: Path) -> bytes:
    packed = io.BytesIO()
    archive.pack(ensure_builtin(TINY, models_dir), packed)
    return packed.getvalue()


def cloud_settings(models_dir: Path, endpoint: str, **extra: Any) -> Settings:
    fields: dict[str, Any] = {
        "models_dir": models_dir,
        "runtime_downloads": True,
        "aws_s3_endpoint_url": endpoint,
        "aws_s3_default_bucket": BUCKET,
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY,
        "aws_default_region": REGION,
        "download_timeout_s": 5,
    }
    return Settings(**(fields | extra))


def ask(**fields: Any) -> GenerateRequest:
    return GenerateRequest(**({"prompt": "realistic field of grass", "num_inference_steps": 3, "seed": 7} | fields))


def published(models_dir: Path) -> list[str]:
    """Everything in the models directory (dot-prefixed leftovers included, so that tests see them)."""
    return sorted(path.name for path in models_dir.iterdir()) if models_dir.exists() else []


def test_first_request_uploads_then_a_fresh_server_loads_the_archive_alone(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Runner(cloud_settings(tmp_path / "first", s3_endpoint))
    built = first.run(ask(model=TINY, model_url="s3://"))
    assert {"loadModel", "compress", "upload"} <= built.timings.keys()  # the original's $timings names
    head = s3_client(s3_endpoint).head_object(Bucket=BUCKET, Key=TINY_KEY)  # type: ignore[attr-defined]
    assert head["ContentLength"] > 0
    assert len(head["Metadata"]["sha256"]) == 64

    def no_source(model_id: str) -> None:
        raise AssertionError("the fresh server must load from the archive, not build the model")

    monkeypatch.setattr(builtin, "build_builtin", no_source)
    fresh_dir = tmp_path / "fresh"
    fresh = Runner(cloud_settings(fresh_dir, s3_endpoint))
    loaded = fresh.run(ask(model=TINY, model_url="s3://"))
    assert "download" in loaded.timings
    assert not {"compress", "upload"} & loaded.timings.keys()
    assert loaded.images == built.images
    assert published(fresh_dir) == ["models--builtin--tiny-sd"]


def test_standard_s3_url_and_precision_in_the_key(s3_endpoint: str, tmp_path: Path) -> None:
    runner = Runner(cloud_settings(tmp_path, s3_endpoint))
    result = runner.run(ask(model=TINY, precision="bf16", model_url=f"s3://{BUCKET}/cache/"))
    assert result.meta["PRECISION"] == "bf16"
    key = "cache/models--builtin--tiny-sd--bf16.tar.zst"
    assert s3_client(s3_endpoint).head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0  # type: ignore[attr-defined]
    assert "models--builtin--tiny-sd--bf16" in published(tmp_path)


def test_checksum_mismatch_is_refused_and_nothing_is_published(s3_endpoint: str, tmp_path: Path) -> None:
    client: Any = s3_client(s3_endpoint)
    client.put_object(Bucket=BUCKET, Key="tampered.tar.zst", Body=b"not what was hashed", Metadata={"sha256": "0" * 64})
    runner = Runner(cloud_settings(tmp_path, s3_endpoint))
    with pytest.raises(StorageError, match="SHA-256"):
        runner.run(ask(model="acme/tampered", model_url=f"s3://{BUCKET}/tampered.tar.zst"))
    assert published(tmp_path) == []


def test_s3_endpoint_down_is_a_clear_error_and_the_server_stays_up(models_dir: Path, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = cloud_settings(tmp_path, dead, model_id=TINY)
    # The default model is the builtin (no MODEL_URL), so the server starts; a request then names the cache.
    app = create_app(settings, SerialEngine(Runner(settings), max_queue=4))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        failed = client.post("/v1/generate", json={"prompt": "x", "model": "acme/other", "model_url": "s3://"})
        assert failed.status_code == 502
        assert failed.json()["error"]["code"] == "STORAGE_ERROR"
        assert "127.0.0.1" in failed.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "READY"
        assert client.post("/v1/generate", json={"prompt": "x", "num_inference_steps": 2}).status_code == 200


def wait_ready(client: TestClient, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/health").json()["status"] != "READY":
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.05)


def test_http_archive_loads(files: FileServer, tiny_archive: bytes, models_dir: Path, tmp_path: Path) -> None:
    files.files["/tiny.tar.zst"] = tiny_archive
    runner = Runner(Settings(models_dir=tmp_path, runtime_downloads=True, allow_private_urls=True))
    served = runner.run(ask(model="acme/tiny", model_url=f"{files.url}/tiny.tar.zst"))
    reference = Runner(Settings(models_dir=models_dir, model_id=TINY))
    reference.start()
    assert served.images == reference.run(ask()).images
    assert published(tmp_path) == ["models--acme--tiny"]


def test_loopback_urls_need_the_opt_in(files: FileServer, tmp_path: Path) -> None:
    runner = Runner(Settings(models_dir=tmp_path, runtime_downloads=True))
    with pytest.raises(InvalidInputs, match="ALLOW_PRIVATE_URLS"):
        runner.run(ask(model="acme/tiny", model_url=f"{files.url}/tiny.tar.zst"))
    assert files.requests == []


def test_download_killed_half_way_leaves_nothing_and_the_next_attempt_succeeds(
    files: FileServer, tiny_archive: bytes, tmp_path: Path
) -> None:
    files.files["/tiny.tar.zst"] = tiny_archive
    files.truncate = 100  # every attempt of the first request dies half-way
    runner = Runner(Settings(models_dir=tmp_path, runtime_downloads=True, allow_private_urls=True))
    url = f"{files.url}/tiny.tar.zst"
    with pytest.raises(StorageError, match="failed after"):
        runner.run(ask(model="acme/tiny", model_url=url))
    assert published(tmp_path) == []
    files.truncate = 0
    assert runner.run(ask(model="acme/tiny", model_url=url)).images
    assert published(tmp_path) == ["models--acme--tiny"]


def test_an_interrupted_download_resumes_where_it_stopped(
    files: FileServer, tiny_archive: bytes, tmp_path: Path
) -> None:
    files.files["/tiny.tar.zst"] = tiny_archive
    files.truncate = 1
    runner = Runner(Settings(models_dir=tmp_path, runtime_downloads=True, allow_private_urls=True))
    assert runner.run(ask(model="acme/tiny", model_url=f"{files.url}/tiny.tar.zst")).images
    assert files.requests == [("/tiny.tar.zst", None), ("/tiny.tar.zst", f"bytes={len(tiny_archive) // 2}-")]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],  # complete transfer of a truncated archive
        lambda data: data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:],
        lambda data: b"<html>not an archive</html>",
    ],
    ids=["truncated-archive", "flipped-byte", "not-an-archive"],
)
def test_corrupt_archive_is_an_error_and_nothing_is_published(
    files: FileServer, tiny_archive: bytes, tmp_path: Path, corrupt: Any
) -> None:
    files.files["/tiny.tar.zst"] = corrupt(tiny_archive)
    runner = Runner(Settings(models_dir=tmp_path, runtime_downloads=True, allow_private_urls=True))
    with pytest.raises(StorageError, match="corrupt"):
        runner.run(ask(model="acme/tiny", model_url=f"{files.url}/tiny.tar.zst"))
    assert published(tmp_path) == []


def test_missing_http_archive_is_model_not_found(files: FileServer, tmp_path: Path) -> None:
    runner = Runner(Settings(models_dir=tmp_path, runtime_downloads=True, allow_private_urls=True))
    with pytest.raises(ModelNotFound, match="no model archive"):
        runner.run(ask(model="acme/tiny", model_url=f"{files.url}/absent.tar.zst"))


@pytest.mark.parametrize(
    "fields",
    [{"model": "acme/never-downloaded"}, {"model": "acme/never-downloaded", "model_url": "s3://"}],
    ids=["hub", "cloud-cache"],
)
def test_unknown_model_offline_names_the_download_command(tmp_path: Path, fields: dict[str, str]) -> None:
    runner = Runner(cloud_settings(tmp_path, f"http://127.0.0.1:{free_port()}", offline=True))
    with pytest.raises(ModelNotFound, match="diffusers-api download"):
        runner.run(ask(**fields))


def test_pickled_checkpoint_is_refused_without_the_opt_in(files: FileServer, tmp_path: Path) -> None:
    files.files["/model.ckpt"] = b"pickle"
    runner = Runner(Settings(models_dir=tmp_path, runtime_downloads=True, allow_private_urls=True))
    with pytest.raises(InvalidInputs, match="ALLOW_PICKLE=1") as caught:
        runner.run(ask(model="acme/pickled", checkpoint_url=f"{files.url}/model.ckpt"))
    assert caught.value.extra["setting"] == "ALLOW_PICKLE"
    assert files.requests == []  # refused before a byte was fetched


@pytest.fixture(scope="module")
def tiny_checkpoint(models_dir: Path) -> bytes:
    """The tiny SD model as one original-format .safetensors file (see support/ldm.py)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save

    pipe = StableDiffusionPipeline.from_pretrained(ensure_builtin(TINY, models_dir))
    return save(ldm_state_dict(pipe))


def test_single_file_checkpoint_over_http_loads(
    files: FileServer, tiny_checkpoint: bytes, models_dir: Path, tmp_path: Path
) -> None:
    files.files["/tiny.safetensors"] = tiny_checkpoint
    # the configuration lies outside this runner's MODELS_DIR: a request may name it once its root is allowed
    allowed = {"runtime_downloads": True, "allow_private_urls": True, "local_model_roots": [models_dir]}
    runner = Runner(Settings(models_dir=tmp_path, **allowed))
    converted = runner.run(
        ask(
            model="acme/tiny-single",
            checkpoint_url=f"{files.url}/tiny.safetensors",
            hf_model_id=str(ensure_builtin(TINY, models_dir)),  # the configuration, offline
            safety_checker=False,
        )
    )
    assert "download" in converted.timings
    assert published(tmp_path) == ["models--acme--tiny-single"]
    reference = Runner(Settings(models_dir=models_dir, model_id=TINY))
    reference.start()
    assert converted.images == reference.run(ask(safety_checker=False)).images
