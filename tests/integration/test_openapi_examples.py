"""The app over the real engine and the tiny model: every request example in the OpenAPI document (what /docs
offers to send as it is) succeeds, and /v1/schedulers lists what the served model really runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from diffusers_api.config import Settings
from diffusers_api.http.app import create_app

WAIT_S = 120


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    settings = Settings(model_id="builtin/tiny-sd", models_dir=models_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        deadline = time.monotonic() + WAIT_S
        while test_client.get("/health").json()["status"] != "READY":
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)
        yield test_client


def request_examples(spec: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(method, path, body) for every example of a JSON request body: the media type's `example` and `examples`,
    and the `examples` of the schema it names."""
    found = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if media is None:
                continue
            bodies = [media["example"]] if "example" in media else []
            bodies += [example["value"] for example in media.get("examples", {}).values()]
            bodies += _schema(spec, media.get("schema", {})).get("examples", [])
            found += [(method.upper(), path, body) for body in bodies]
    return found


def _schema(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def finished_job(client: TestClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck at {job}"
        time.sleep(0.05)


def test_every_request_example_runs_on_the_served_model(client: TestClient) -> None:
    examples = request_examples(client.get("/openapi.json").json())
    # the legacy envelope's, and each GenerateRequest example on both /v1/generate and /v1/jobs
    assert {(method, path) for method, path, _ in examples} == {
        ("POST", "/"),
        ("POST", "/v1/generate"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/upscale"),
    }
    assert len(examples) >= 5
    for method, path, body in examples:
        response = client.request(method, path, json=body)
        assert response.status_code in (200, 202), (path, body, response.text)
        if path == "/v1/jobs":
            job = finished_job(client, response.json()["id"])
            assert job["status"] == "COMPLETED", (body, job)


def test_examples_name_no_model(client: TestClient) -> None:
    """A named model fails with MODEL_MISMATCH on every server that serves another one."""
    for _, path, body in request_examples(client.get("/openapi.json").json()):
        if path == "/v1/upscale":  # its `model` is an upscaler, and every server has builtin/tiny-upscaler
            assert body["model"] == "builtin/tiny-upscaler"
            continue
        assert "model" not in body
        assert "MODEL_ID" not in body.get("callInputs", {})


def test_schedulers_are_the_ones_the_model_runs(client: TestClient) -> None:
    listed = client.get("/v1/schedulers").json()
    assert listed["model"] == "builtin/tiny-sd"
    assert {"Euler a", "DPM++ 2M Karras", "DDIMScheduler"} <= set(listed["schedulers"])
    assert "LCM" not in listed["schedulers"]  # an alias the registry knows, but not for an SD model
    unlisted = client.post("/v1/generate", json={"prompt": "x", "num_inference_steps": 2, "scheduler": "LCM"})
    assert unlisted.json()["error"]["code"] == "INVALID_SCHEDULER"

    plain = client.post("/v1/generate", json={"prompt": "x", "num_inference_steps": 2}).json()
    assert plain["meta"]["SCHEDULER"] == listed["default"]


def test_every_listed_scheduler_runs(client: TestClient) -> None:
    failed = {}
    for name in client.get("/v1/schedulers").json()["schedulers"]:
        # 4 steps: PNDM's warm-up needs more than 2 (diffusers refuses fewer with a shape error)
        response = client.post("/v1/generate", json={"prompt": "x", "num_inference_steps": 4, "scheduler": name})
        if response.status_code != 200:
            failed[name] = response.text
    assert failed == {}
