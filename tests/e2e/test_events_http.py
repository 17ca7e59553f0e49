"""Webhooks and NDJSON streams from the real server over real HTTP, received by a real local receiver."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from diffusers_api.client import Client, verify_webhook
from support import envelopes
from support.processes import Process, free_port, serving
from support.receiver import Post, Receiver, receiver

pytestmark = pytest.mark.e2e

KEY = "e2e-sign-key"
STEPS = 6
WEBHOOK_TIMEOUT_S = 20


def grass(**call_inputs: object) -> dict[str, object]:
    return envelopes.grass(STEPS, call_inputs, callback_steps=2)


@pytest.fixture(scope="module")
def hook() -> Iterator[Receiver]:
    with receiver() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def server(models_dir: Path, hook: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    env = {
        "SEND_URL": hook.url,
        "SIGN_KEY": KEY,
        "CONTAINER_ID": "e2e-box",
        "WEBHOOK_TIMEOUT_S": str(WEBHOOK_TIMEOUT_S),
        "ALLOW_PRIVATE_URLS": "1",  # the receivers of these tests listen on loopback
    }
    with serving(models_dir, tmp_path_factory.mktemp("events") / "server.log", env) as process:
        yield process


def events(posts: list[Post], request_id: str | None = None) -> list[dict]:
    parsed = [post.json() for post in posts]
    return [event for event in parsed if request_id is None or event["startRequestId"] == request_id]


def test_init_events_arrive_signed(server: Process, hook: Receiver) -> None:
    posts = hook.wait_for(lambda posts: ("init", "done") in [(e["type"], e["status"]) for e in events(posts)])
    init = [(event["type"], event["status"]) for event in events(posts) if event["type"] == "init"]
    assert init == [("init", "start"), ("init", "done")]
    assert all(verify_webhook(KEY, post.body, post.headers) for post in posts)
    done = next(event for event in events(posts) if event["status"] == "done")
    assert done["container_id"] == "e2e-box"
    assert done["payload"]["timings"]["init"] > 0


def test_inference_events_and_progress_arrive_signed(server: Process, hook: Receiver) -> None:
    response = httpx.post(f"{server.url}/", json=grass(startRequestId="req-1"), timeout=120)
    assert response.status_code == 200, response.text

    def finished(posts: list[Post]) -> bool:
        return any(event["status"] == "done" for event in events(posts, "req-1"))

    posts = [post for post in hook.wait_for(finished) if post.json()["startRequestId"] == "req-1"]
    sequence = [(event["type"], event["status"]) for event in events(posts)]
    assert sequence[0] == ("inference", "start")
    assert sequence[-1] == ("inference", "done")
    progress = [event["payload"] for event in events(posts) if event["status"] == "progress"]
    assert [(p["step"], p["steps"]) for p in progress] == [(2, STEPS), (4, STEPS), (6, STEPS)]
    assert all(p["eta_s"] >= 0 for p in progress)  # seconds left at the pace so far
    assert progress[-1]["eta_s"] == 0
    assert all(verify_webhook(KEY, post.body, post.headers) for post in posts)
    assert events(posts)[-1]["payload"]["timings"]["inference"] > 0
    assert KEY not in response.text


def test_stream_events_answers_ndjson_with_the_result_last(server: Process) -> None:
    lines = []
    with httpx.stream("POST", f"{server.url}/", json=grass(streamEvents=True), timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    statuses = [line.get("status") for line in lines[:-1]]
    assert statuses == ["start", "progress", "progress", "progress", "done"]
    result = lines[-1]
    assert base64.b64decode(result["image_base64"]).startswith(b"\x89PNG")
    assert result["$timings"]["inference"] > 0


def test_the_client_reads_a_stream_and_keeps_its_events(server: Process) -> None:
    reply = Client(f"{server.url}/").send(grass(streamEvents=True))
    assert [event["status"] for event in reply.events] == ["start", "progress", "progress", "progress", "done"]
    assert reply.images[0].startswith(b"\x89PNG")


def test_a_stream_that_fails_ends_with_the_error_line(server: Process) -> None:
    envelope = grass(streamEvents=True, SCHEDULER="NoSuchScheduler")
    with httpx.stream("POST", f"{server.url}/", json=envelope, timeout=120) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["$error"]["code"] == "INVALID_SCHEDULER"
    assert lines[-2]["status"] == "error"


def timed_request(server: Process, **call_inputs: object) -> tuple[float, float]:
    """(wall seconds, seconds outside the runner's own phases): webhook work on the request path would show
    in the second number, whatever the machine's load does to inference itself."""
    started = time.perf_counter()
    response = httpx.post(f"{server.url}/", json=grass(**call_inputs), timeout=120)
    wall = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return wall, wall - sum(response.json()["$timings"].values()) / 1000


def test_a_hanging_or_down_receiver_does_not_slow_inference(server: Process) -> None:
    """Runs last: the hanging receiver holds the delivery thread (WEBHOOK_TIMEOUT_S per attempt, retried)."""
    down = f"http://127.0.0.1:{free_port()}/hook"
    with receiver(hang=True) as stuck:
        hanging = [timed_request(server, SEND_URL=stuck.url) for _ in range(2)]
        assert stuck.wait_for(lambda posts: posts, timeout=10)  # it was called, and it hangs
    refused = timed_request(server, SEND_URL=down)
    for wall, overhead in [*hanging, refused]:
        # Delivery on the request path would cost at least one WEBHOOK_TIMEOUT_S per event.
        assert wall < WEBHOOK_TIMEOUT_S, (hanging, refused)
        assert overhead < 1.5, (hanging, refused)


def test_health_reports_the_batched_loop(server: Process) -> None:
    response = httpx.post(f"{server.url}/", json=grass(), timeout=120)
    assert response.json()["$meta"]["LOOP"] == "batched"
    batching = httpx.get(f"{server.url}/health").json()["batching"]
    assert batching["loop"]["jobs"] >= 1
    assert batching["forwards"] >= STEPS
