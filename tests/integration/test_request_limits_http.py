"""What the issue reported over HTTP, on the real batching engine and the tiny model: a size below the model's
smallest and a prompt over MAX_PROMPT_CHARS are 422s in the error format, and a prompt at the limit does not
hold up a health probe while it runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from diffusers_api.config import Settings
from diffusers_api.http.app import create_app

TINY = {"prompt": "a", "width": 8, "height": 8, "guidance_scale": 1}


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    settings = Settings(model_id="builtin/tiny-sd", models_dir=models_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").json()["status"] != "READY":
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)
        yield client


def test_a_size_below_the_models_smallest_is_a_422_on_both_apis(client: TestClient) -> None:
    native = client.post("/v1/generate", json=TINY)
    legacy = client.post("/", json={"modelInputs": TINY, "callInputs": {}})
    assert native.status_code == legacy.status_code == 422
    assert native.json()["error"] == legacy.json()["$error"]
    error = native.json()["error"]
    assert (error["code"], error["field"], error["minimum"]) == ("INVALID_INPUTS", "width", 16)


def test_the_smallest_size_makes_an_image_in_the_batched_loop(client: TestClient) -> None:
    response = client.post("/v1/generate", json=TINY | {"width": 16, "height": 16, "num_inference_steps": 2})
    assert response.status_code == 200
    assert response.json()["meta"]["LOOP"] == "batched"


def test_a_prompt_over_the_limit_is_a_422_naming_the_field_and_the_limit(client: TestClient) -> None:
    native = client.post("/v1/generate", json={"prompt": "a" * 10_001})
    legacy = client.post("/", json={"modelInputs": {"negative_prompt": "a" * 10_001}, "callInputs": {}})
    assert native.status_code == legacy.status_code == 422
    message = "prompt: 10001 characters, more than the 10000 allowed (MAX_PROMPT_CHARS)"
    assert native.json()["error"]["message"] == message
    assert legacy.json()["$error"]["field"] == "negative_prompt"
    assert legacy.json()["$error"]["limit"] == 10_000


def test_a_prompt_at_the_limit_does_not_hold_up_health_probes(client: TestClient) -> None:
    """Its tokenization runs on the engine's threads, and at the limit it holds the GIL for milliseconds (with
    two million characters other threads stalled for over a second at a time: hence the limit)."""
    long = ("a lighthouse at dusk, " * 500)[:10_000]
    body = {"prompt": long, "negative_prompt": long, "num_inference_steps": 25, "width": 128, "height": 128}
    answers: list[httpx.Response] = []
    work = threading.Thread(target=lambda: answers.append(client.post("/v1/generate", json=body)))
    work.start()
    probes: list[float] = []
    while work.is_alive():
        started = time.perf_counter()
        assert client.get("/health").status_code == 200
        probes.append(time.perf_counter() - started)
        time.sleep(0.02)
    work.join()
    assert answers[0].status_code == 200
    assert len(probes) >= 3, "the request ended before it could be probed"
    assert max(probes) < 1.0, f"slowest /health took {max(probes):.2f} s"
