"""Ray Serve on a local Ray cluster: two replicas of the tiny SD model behind Ray's HTTP proxy. Concurrent
requests are spread over both (each answer names its replica in X-Replica) and come back as the right images; a
job's calls that carry one X-Session-Id all reach the replica that holds the job (also the Python client's); the
legacy envelope, errors and the health route work unchanged through the proxy."""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from diffusers_api.client import JobsClient
from support.servers import free_port

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'diffusers-api[ray]'")

pytestmark = pytest.mark.ray

REPLICAS = 2
REQUESTS = 16  # concurrent generations: all landing on one replica of two has a chance of 2**-15
SIZE = 64
WAIT_S = 120


@pytest.fixture(scope="module")
def proxy(models_dir: Path) -> Iterator[str]:
    """The proxy's URL, with two replicas of builtin/tiny-sd running behind it; everything stops afterwards."""
    import ray
    from ray import serve

    from diffusers_api.ray import app

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's sockets live under its temp dir, and a Unix socket's path is bounded (107 bytes): pytest's tmp_path is
    # too deep for it, so a short directory of /tmp, removed with the cluster.
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        ray.init(
            num_cpus=REPLICAS,
            num_gpus=0,
            include_dashboard=False,
            _temp_dir=temp_dir,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            settings = {"model_id": "builtin/tiny-sd", "models_dir": str(models_dir), "max_batch_size": "8"}
            serve.run(app({**settings, "replicas": str(REPLICAS)}), name="diffusers", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def generate(url: str, seed: int) -> httpx.Response:
    body = {"prompt": "a field of grass", "num_inference_steps": 2, "width": SIZE, "height": SIZE, "seed": seed}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=WAIT_S)


def decoded(image: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image["data"])))


def test_concurrent_requests_are_spread_over_both_replicas(proxy: str) -> None:
    with ThreadPoolExecutor(REQUESTS) as pool:
        responses = list(pool.map(lambda seed: generate(proxy, seed), range(REQUESTS)))
    assert [r.status_code for r in responses] == [200] * REQUESTS, responses[0].text
    assert len({r.headers["x-replica"] for r in responses}) == REPLICAS
    for seed, response in enumerate(responses):
        (image,) = response.json()["images"]
        assert image["seed"] == seed
        assert decoded(image).size == (SIZE, SIZE)
    # the same seed gives the same image whichever replica made it (batched with others or alone: within one 8-bit
    # level, see README "Seeds and reproducibility")
    again = np.asarray(decoded(generate(proxy, 3).json()["images"][0]), dtype=np.int16)
    first = np.asarray(decoded(responses[3].json()["images"][0]), dtype=np.int16)
    assert np.abs(again - first).max() <= 2


def test_a_jobs_calls_with_one_session_id_reach_its_replica(proxy: str) -> None:
    session = {"X-Session-Id": "client-7"}
    body = {"prompt": "a lighthouse", "num_inference_steps": 2, "width": SIZE, "height": SIZE, "seed": 5}
    created = httpx.post(f"{proxy}/v1/jobs", json=body, headers=session, timeout=WAIT_S)
    assert created.status_code == 202, created.text
    replicas = {created.headers["x-replica"]}
    job_id = created.json()["id"]
    deadline = time.monotonic() + WAIT_S
    while True:
        polled = httpx.get(f"{proxy}/v1/jobs/{job_id}", headers=session, timeout=WAIT_S)
        assert polled.status_code == 200, polled.text  # a call on the other replica would be NO_SUCH_JOB
        replicas.add(polled.headers["x-replica"])
        if polled.json()["status"] not in ("IN_QUEUE", "IN_PROGRESS") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert polled.json()["status"] == "COMPLETED", polled.text
    assert decoded(polled.json()["result"]["images"][0]).size == (SIZE, SIZE)
    assert len(replicas) == 1


def test_the_python_clients_jobs_complete_through_the_proxy(proxy: str) -> None:
    """JobsClient sends one X-Session-Id per job: its polls never land on the replica without the job."""
    client = JobsClient(proxy, timeout_s=WAIT_S, poll_interval_s=0.05)
    envelope = {
        "modelInputs": {"prompt": "a barn", "num_inference_steps": 2, "width": SIZE, "height": SIZE},
        "callInputs": {},
    }
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda seed: client.send(_seeded(envelope, seed)), range(6)))
    for seed, reply in enumerate(replies):
        (image,) = reply.images
        assert Image.open(io.BytesIO(image)).size == (SIZE, SIZE)
        assert reply.body["$meta"]["seed"] == seed


def _seeded(envelope: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**envelope, "modelInputs": {**envelope["modelInputs"], "seed": seed}}


def test_legacy_envelope_and_health_through_the_proxy(proxy: str) -> None:
    envelope = {
        "modelInputs": {"prompt": "grass", "num_inference_steps": 2, "width": SIZE, "height": SIZE},
        "callInputs": {},
    }
    legacy = httpx.post(f"{proxy}/", json=envelope, timeout=WAIT_S)
    assert legacy.status_code == 200, legacy.text
    image = Image.open(io.BytesIO(base64.b64decode(legacy.json()["image_base64"])))
    assert image.size == (SIZE, SIZE)
    health = httpx.get(f"{proxy}/health", timeout=WAIT_S)
    assert health.status_code == 200
    assert health.json()["status"] == "READY"
    bad = httpx.post(f"{proxy}/v1/generate", json={"prompt": "x", "num_inference_steps": 0}, timeout=WAIT_S)
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "INVALID_INPUTS"
