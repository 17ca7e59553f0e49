"""/v1/jobs on the real server (tiny SD, batching engine) over real HTTP: a job runs to its image, and a
cancelled job stops within one denoising step while the job batched with it finishes."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from diffusers_api.client import ClientError, JobsClient, run_tests
from support.processes import Process, serving

pytestmark = pytest.mark.e2e

WAIT_S = 120
LONG_STEPS = 1000  # far more than the test waits for (seconds): the job only ends early if cancelled


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    env = {"MAX_BATCH_SIZE": "2", "PROGRESS_INTERVAL_S": "0"}
    with serving(models_dir, tmp_path_factory.mktemp("jobs") / "server.log", env) as process:
        yield process


def status(server: Process, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30)
    response.raise_for_status()
    return response.json()


def wait_until(server: Process, job_id: str, done: Any) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        body = status(server, job_id)
        if done(body):
            return body
        assert time.monotonic() < deadline, f"job {job_id} stuck at {body}"
        time.sleep(0.02)


def loop_rounds(server: Process) -> int:
    return int(httpx.get(f"{server.url}/health", timeout=30).json()["batching"]["loop"]["rounds"])


def submit(server: Process, **body: Any) -> str:
    response = httpx.post(f"{server.url}/v1/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_a_job_runs_to_its_image(server: Process) -> None:
    job_id = submit(server, prompt="a red barn", seed=3, num_inference_steps=4)
    done = wait_until(server, job_id, lambda body: body["status"] not in ("IN_QUEUE", "IN_PROGRESS"))
    assert done["status"] == "COMPLETED", done
    assert done["progress"] == {"stage": "done", "step": 4, "steps": 4}
    assert done["result"]["meta"]["LOOP"] == "batched"
    image = Image.open(io.BytesIO(base64.b64decode(done["result"]["images"][0]["data"])))
    assert image.size == (64, 64)


def test_a_cancelled_job_stops_within_a_step_and_its_batch_mate_finishes(server: Process) -> None:
    doomed = submit(server, prompt="a long one", seed=1, num_inference_steps=LONG_STEPS)
    wait_until(server, doomed, lambda body: body["progress"].get("step", 0) >= 2)
    mate = submit(server, prompt="a short one", seed=2, num_inference_steps=30)
    wait_until(server, mate, lambda body: body["progress"].get("step", 0) >= 1)  # now they share each step

    running_job = status(server, doomed)
    assert running_job["status"] == "IN_PROGRESS"
    assert running_job["progress"]["stage"] == "inference"
    assert running_job["progress"]["steps"] == LONG_STEPS
    assert running_job["progress"]["eta_s"] > 0

    cancelled = httpx.delete(f"{server.url}/v1/jobs/{doomed}", timeout=30).json()
    assert cancelled["status"] == "CANCELLED"
    assert cancelled["error"]["code"] == "CANCELLED"

    finished = wait_until(server, mate, lambda body: body["status"] != "IN_PROGRESS")
    assert finished["status"] == "COMPLETED", finished
    assert finished["progress"]["step"] == 30

    # Once the mate is done, the loop has nothing left to step: the cancelled job is gone, not running on.
    rounds = loop_rounds(server)
    time.sleep(0.5)
    assert loop_rounds(server) == rounds
    assert status(server, doomed)["status"] == "CANCELLED"


def test_cancelling_a_running_job_stops_it_at_the_next_step(server: Process) -> None:
    job_id = submit(server, prompt="alone", seed=5, num_inference_steps=LONG_STEPS)
    wait_until(server, job_id, lambda body: body["progress"].get("step", 0) >= 3)
    httpx.delete(f"{server.url}/v1/jobs/{job_id}", timeout=30).raise_for_status()
    at_cancel = loop_rounds(server)
    time.sleep(0.5)
    # the round that was running when the cancellation came may finish; no round starts after it
    assert loop_rounds(server) - at_cancel <= 1


def test_the_client_sends_a_test_as_a_job_and_prints_its_steps(server: Process, tmp_path: Path) -> None:
    lines: list[str] = []
    run_tests(
        ["txt2img"],
        url=server.url,
        jobs=True,
        model_args=["num_inference_steps=5", "width=64", "height=64"],
        output_dir=tmp_path,
        out=lines.append,
    )
    assert any("step 5/5" in line for line in lines), lines
    assert any("COMPLETED" in line for line in lines), lines
    with Image.open(tmp_path / "txt2img.png") as saved:
        assert saved.size == (64, 64)


def test_the_client_reports_a_failed_job(server: Process, tmp_path: Path) -> None:
    with pytest.raises(ClientError, match=r"ended FAILED: MODEL_MISMATCH"):
        run_tests(["txt2img"], url=server.url, jobs=True, call_args=["MODEL_ID=another/model"], output_dir=tmp_path)


def test_the_client_cancels_a_job_it_stops_waiting_for(server: Process) -> None:
    client = JobsClient(server.url, timeout_s=1.0)
    envelope = {"modelInputs": {"prompt": "long", "num_inference_steps": LONG_STEPS}, "callInputs": {}}
    with pytest.raises(ClientError, match=r"after 1 s; cancelled it") as caught:
        client.send(envelope)
    job_id = str(caught.value).split()[1]
    assert status(server, job_id)["status"] == "CANCELLED"
