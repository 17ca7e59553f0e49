"""`diffusers-api download` (the real CLI in a subprocess) at "build time", then a server with no network."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from diffusers_api.config import Settings
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest
from support.servers import ACCESS_KEY, REGION, SECRET_KEY, free_port, moto_s3

pytestmark = pytest.mark.e2e

BUCKET = "build-cache"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


def download(models_dir: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "MODELS_DIR": str(models_dir),
        "AWS_S3_ENDPOINT_URL": endpoint,
        "AWS_S3_DEFAULT_BUCKET": BUCKET,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }
    command = [sys.executable, "-m", "diffusers_api", "download", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_download_at_build_time_then_serve_offline(s3_endpoint: str, tmp_path: Path) -> None:
    built = download(tmp_path / "builder", s3_endpoint, "--model", "builtin/tiny-sd", "--model-url", "s3://")
    assert built.returncode == 0, built.stderr
    assert "builtin/tiny-sd: added to the cloud cache (MODEL_URL): fetched from its source, packed and " in built.stdout
    image_dir = tmp_path / "image"
    fetched = download(image_dir, s3_endpoint, "--model", "builtin/tiny-sd", "--model-url", "s3://")
    assert fetched.returncode == 0, fetched.stderr
    assert "builtin/tiny-sd: downloaded in " in fetched.stdout
    again = download(image_dir, s3_endpoint, "--model", "builtin/tiny-sd", "--model-url", "s3://")
    stored = image_dir / "models--builtin--tiny-sd"
    assert again.stdout == f"builtin/tiny-sd: already on disk, nothing to download: {stored}\n"
    # The image starts with no network at all: OFFLINE, and an S3 endpoint that does not answer.
    settings = Settings(
        models_dir=image_dir,
        model_id="builtin/tiny-sd",
        model_url="s3://",
        offline=True,
        aws_s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        aws_s3_default_bucket=BUCKET,
    )
    runner = Runner(settings)
    runner.start()
    result = runner.run(GenerateRequest(prompt="grass", num_inference_steps=2, seed=3))
    assert result.meta["MODEL_ID"] == "builtin/tiny-sd"
    assert "download" not in result.timings


def test_download_failure_is_a_clear_message(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    failed = download(tmp_path, dead, "--model", "acme/other", "--model-url", "s3://")
    assert failed.returncode == 1
    assert "STORAGE_ERROR" in failed.stderr
    assert "Traceback" not in failed.stderr
