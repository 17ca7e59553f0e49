"""Training on the real server (tiny SD) over real HTTP, uploading to a real S3-compatible server (moto on
loopback): `POST /v1/train` queues a job whose LoRA lands in S3 and then serves as lora_weights, and the legacy
envelope with `callInputs.train` answers `done` once its result is uploaded."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from support.processes import Process, serving
from support.servers import ACCESS_KEY, REGION, SECRET_KEY, moto_s3, s3_client

pytestmark = pytest.mark.e2e

BUCKET = "results"
WAIT_S = 120


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_s3(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def server(models_dir: Path, endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    env = {
        "AWS_S3_ENDPOINT_URL": endpoint,
        "AWS_S3_DEFAULT_BUCKET": BUCKET,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "OMP_NUM_THREADS": "1",  # a tiny model trains faster on one thread than on two busy cores
    }
    with serving(models_dir, tmp_path_factory.mktemp("training") / "server.log", env) as process:
        yield process


def arguments(**extra: Any) -> dict[str, Any]:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, "PNG")
    images = [base64.b64encode(out.getvalue()).decode()]
    return {"instance_images": images, "instance_prompt": "sks", "resolution": 32, "seed": 1} | extra


def test_post_v1_train_runs_a_job_whose_lora_lands_in_s3(server: Process, endpoint: str) -> None:
    unknown = httpx.post(f"{server.url}/v1/train", json=arguments(max_steps=3, name="x"), timeout=30)
    assert unknown.status_code == 422
    assert "max_train_steps" in unknown.json()["error"]["known"]

    body = arguments(max_train_steps=3, learning_rate=0.01, name="e2e-lora", dest_url="s3://")
    created = httpx.post(f"{server.url}/v1/train", json=body, timeout=30)
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + WAIT_S
    while (job := httpx.get(f"{server.url}{created.headers['Location']}", timeout=30).json())["status"] in (
        "IN_QUEUE",
        "IN_PROGRESS",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "COMPLETED", job
    assert job["progress"] == {"stage": "done", "step": 3, "steps": 3}
    assert job["result"]["lora_weights"] == "trained/e2e-lora"
    s3_client(endpoint).head_object(Bucket=BUCKET, Key="e2e-lora.safetensors")  # type: ignore[attr-defined]

    again = httpx.post(f"{server.url}/v1/train", json=body, timeout=30)
    assert again.status_code == 422
    assert "exists already" in again.json()["error"]["message"]
    request = {"prompt": "sks", "num_inference_steps": 2, "width": 32, "height": 32, "lora_weights": "trained/e2e-lora"}
    generated = httpx.post(f"{server.url}/v1/generate", json=request, timeout=60)
    assert generated.status_code == 200, generated.text


def test_the_legacy_envelope_trains_and_answers_done(server: Process, endpoint: str) -> None:
    envelope = {
        "modelInputs": arguments(max_train_steps=2, use_8bit_adam=True),
        "callInputs": {"train": "dreambooth", "dest_url": f"s3:///{BUCKET}/legacy/model.safetensors"},
    }
    answer = httpx.post(f"{server.url}/", json=envelope, timeout=WAIT_S)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["done"] is True
    assert body["steps"] == 2
    assert {"training", "upload"} <= body["$timings"].keys()
    s3_client(endpoint).head_object(Bucket=BUCKET, Key="legacy/model.safetensors")  # type: ignore[attr-defined]
