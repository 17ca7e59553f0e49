"""/v1/jobs over a fake engine: lifecycle, progress, server-sent events, cancellation, expiry, limits."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi.testclient import TestClient

from diffusers_api.config import Settings
from diffusers_api.engine import Health
from diffusers_api.errors import ModelMismatch
from support.apps import make_client
from support.fakes import FakeEngine

WAIT_S = 10


def wait_for(client: TestClient, job_id: str, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        body = client.get(f"/v1/jobs/{job_id}").json()
        if body["status"] in states or time.monotonic() > deadline:
            return body
        time.sleep(0.01)


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each message of a text/event-stream body; comments are skipped."""
    messages, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert name is not None, "data before its event line"
            messages.append((name, json.loads(line.removeprefix("data: "))))
            name = None
    return messages


def test_a_job_is_queued_then_completes_with_its_images(client: TestClient, engine: FakeEngine) -> None:
    engine.queued_s, engine.delay_s = 0.3, 0.3
    response = client.post("/v1/jobs", json={"prompt": "a barn", "seed": 7, "num_images_per_prompt": 2})
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "IN_QUEUE"
    assert job["progress"] == {"stage": "queued"}
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert "result" not in job

    running = wait_for(client, job["id"], "IN_PROGRESS", "COMPLETED")
    assert running["status"] == "IN_PROGRESS"
    assert running["progress"]["stage"] == "starting"
    assert running["started_at"] >= running["created_at"]

    done = wait_for(client, job["id"], "COMPLETED")
    assert done["status"] == "COMPLETED"
    assert done["progress"]["stage"] == "done"
    assert [image["seed"] for image in done["result"]["images"]] == [7, 8]
    assert base64.b64decode(done["result"]["images"][0]["data"]).startswith(b"\x89PNG")
    assert done["finished_at"] >= done["started_at"]
    # the job's id names the request in events and meta when the request has no id of its own
    assert engine.requests[0].request_id == job["id"]


def test_progress_is_reported_with_step_steps_and_eta(client: TestClient, engine: FakeEngine) -> None:
    engine.steps = 5
    job = client.post("/v1/jobs", json={"prompt": "a barn"}).json()
    done = wait_for(client, job["id"], "COMPLETED")
    assert done["progress"] == {"stage": "done", "step": 5, "steps": 5}


def test_a_failed_job_carries_the_error_code(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_with = ModelMismatch("this server serves a", requested="b", available=["a"])
    job = client.post("/v1/jobs", json={"prompt": "a barn", "model": "b"}).json()
    failed = wait_for(client, job["id"], "FAILED")
    assert failed["status"] == "FAILED"
    assert failed["error"] == {
        "code": "MODEL_MISMATCH",
        "name": "ModelMismatch",
        "message": "this server serves a",
        "requested": "b",
        "available": ["a"],
    }
    assert "result" not in failed


def test_cancelling_a_queued_job_means_it_never_runs(client: TestClient, engine: FakeEngine) -> None:
    engine.queued_s = 0.5
    job = client.post("/v1/jobs", json={"prompt": "a barn"}).json()
    cancelled = client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "CANCELLED"
    assert cancelled.json()["error"]["code"] == "CANCELLED"
    time.sleep(0.8)  # past the time it would have started
    later = client.get(f"/v1/jobs/{job['id']}").json()
    assert later["status"] == "CANCELLED"
    assert "started_at" not in later
    assert later["progress"] == {"stage": "queued"}


def test_cancelling_a_finished_job_changes_nothing(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"prompt": "a barn"}).json()
    wait_for(client, job["id"], "COMPLETED")
    again = client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 200
    assert again.json()["status"] == "COMPLETED"
    assert again.json()["result"]["images"]


def test_events_stream_status_events_then_the_final_status(client: TestClient, engine: FakeEngine) -> None:
    engine.queued_s, engine.steps = 1.0, 3  # long enough that the stream opens while the job is queued
    job = client.post("/v1/jobs", json={"prompt": "a barn", "callback_steps": 1}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = sse(response.read().decode())
    names = [name for name, _ in messages]
    assert names[0] == "status"
    assert names[-1] == "status"
    assert messages[0][1]["status"] in ("IN_QUEUE", "IN_PROGRESS")
    events = [data for name, data in messages if name == "event"]
    assert [(e["status"], e["payload"].get("step")) for e in events] == [
        ("progress", 1),
        ("progress", 2),
        ("progress", 3),
        ("done", None),
    ]
    assert all(e["startRequestId"] == job["id"] for e in events)
    final = messages[-1][1]
    assert final["status"] == "COMPLETED"
    assert final["result"]["images"]


def test_events_of_a_finished_job_are_its_final_status(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"prompt": "a barn"}).json()
    wait_for(client, job["id"], "COMPLETED")
    messages = sse(client.get(f"/v1/jobs/{job['id']}/events").text)
    assert [name for name, _ in messages] == ["status", "status"]
    assert messages[-1][1]["status"] == "COMPLETED"


def test_events_of_a_cancelled_job_end_with_cancelled(client: TestClient, engine: FakeEngine) -> None:
    engine.queued_s = 5
    job = client.post("/v1/jobs", json={"prompt": "a barn"}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        lines = response.iter_lines()
        first = next(lines)
        assert first == "event: status"  # the stream is open; now cancel from elsewhere
        client.delete(f"/v1/jobs/{job['id']}")
        messages = sse("\n".join([first, *lines]))
    assert [name for name, _ in messages] == ["status", "status"]
    assert messages[-1][1]["status"] == "CANCELLED"


def test_unknown_job_is_404(client: TestClient) -> None:
    for method, path in (("GET", "/v1/jobs/nope"), ("DELETE", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events")):
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "NO_SUCH_JOB"


def test_bad_inputs_are_refused_before_queueing(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/jobs", json={"prompt": "a", "num_inference_steps": 0})
    assert response.status_code == 422
    assert "num_inference_steps" in response.json()["error"]["message"]
    streamed = client.post("/v1/jobs", json={"prompt": "a", "stream_events": True})
    assert streamed.status_code == 422
    assert "/events" in streamed.json()["error"]["message"]
    assert engine.requests == []


def test_jobs_are_refused_until_the_model_is_ready(engine: FakeEngine) -> None:
    engine.health = Health.STARTING
    with make_client(engine) as client:
        response = client.post("/v1/jobs", json={"prompt": "a"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "NOT_READY"


def test_too_many_unfinished_jobs_is_busy(engine: FakeEngine) -> None:
    engine.queued_s = 5
    with make_client(engine, max_queue=1, max_batch_size=1) as client:
        ids = [client.post("/v1/jobs", json={"prompt": "a"}).json()["id"] for _ in range(2)]
        third = client.post("/v1/jobs", json={"prompt": "a"})
        assert third.status_code == 503
        assert third.json()["error"]["code"] == "BUSY"
        client.delete(f"/v1/jobs/{ids[0]}")  # a cancelled job frees its place at once
        assert client.post("/v1/jobs", json={"prompt": "a"}).status_code == 202


def test_finished_jobs_are_forgotten_after_the_ttl_and_beyond_the_count(engine: FakeEngine) -> None:
    with make_client(engine, jobs_kept=2) as client:
        store = client.app.state.services.jobs  # type: ignore[attr-defined]
        now = [0.0]
        store.clock = lambda: now[0]
        ids = []
        for _ in range(3):
            ids.append(client.post("/v1/jobs", json={"prompt": "a"}).json()["id"])
            wait_for(client, ids[-1], "COMPLETED")
        assert client.get(f"/v1/jobs/{ids[0]}").status_code == 404  # only the 2 newest are kept
        assert client.get(f"/v1/jobs/{ids[1]}").status_code == 200
        now[0] = Settings().jobs_ttl_s + 1
        assert client.get(f"/v1/jobs/{ids[2]}").status_code == 404


def test_jobs_need_the_api_key(engine: FakeEngine) -> None:
    with make_client(engine, api_key="k") as client:
        assert client.post("/v1/jobs", json={"prompt": "a"}).status_code == 401
        job = client.post("/v1/jobs", json={"prompt": "a"}, headers={"Authorization": "Bearer k"}).json()
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 401
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 401


def test_a_jobs_events_token_opens_its_stream_and_nothing_else(engine: FakeEngine) -> None:
    """A browser's EventSource cannot send Authorization: the job's events_url carries a token instead."""
    auth = {"Authorization": "Bearer k"}
    with make_client(engine, api_key="k") as client:
        job = client.post("/v1/jobs", json={"prompt": "a"}, headers=auth).json()
        other = client.post("/v1/jobs", json={"prompt": "b"}, headers=auth).json()
        url = job["events_url"]
        assert url.startswith(f"/v1/jobs/{job['id']}/events?token=")
        token = url.split("token=")[1]
        with client.stream("GET", url) as response:
            assert response.status_code == 200
            messages = sse(response.read().decode())
        assert messages[-1][1]["status"] == "COMPLETED"
        assert client.get(f"/v1/jobs/{job['id']}/events").status_code == 401  # neither token nor key
        altered = ("1" if token[0] == "0" else "0") + token[1:]
        assert client.get(f"/v1/jobs/{job['id']}/events?token={altered}").status_code == 401
        assert client.get(f"/v1/jobs/{other['id']}/events?token={token}").status_code == 401  # another job's
        assert client.get(f"/v1/jobs/{job['id']}?token={token}").status_code == 401  # the events alone
        assert client.get(f"/v1/jobs/{job['id']}/events", headers=auth).status_code == 200  # the key still opens it
        refused = client.get(f"/v1/jobs/{job['id']}/events?token=nope").json()
        assert refused["error"]["code"] == "UNAUTHORIZED"
        assert "events_url" in refused["error"]["message"]


def test_without_an_api_key_the_events_url_has_no_token(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"prompt": "a"}).json()
    assert job["events_url"] == f"/v1/jobs/{job['id']}/events"
    assert client.get(job["events_url"]).status_code == 200
