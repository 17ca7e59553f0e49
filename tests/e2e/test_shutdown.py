"""How `diffusers-api serve` stops, as a supervisor sees it: SIGTERM drains the work in flight for DRAIN_TIMEOUT_S,
then cancels the rest with their last events delivered; a model that cannot load makes it exit non-zero."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.processes import cli, free_port, offline_env, serving
from support.receiver import Post, receiver

pytestmark = pytest.mark.e2e

DRAIN_S = 6
LONG_STEPS = 1000  # far longer than the drain: cancelled when it ends
SHORT_STEPS = 40  # long enough to be running at SIGTERM, short enough to finish within the drain


def inference_events(posts: list[Post], request_id: str) -> list[dict[str, Any]]:
    events = [post.json() for post in posts]
    return [e for e in events if e["type"] == "inference" and e["startRequestId"] == request_id]


def final(posts: list[Post], request_id: str) -> dict[str, Any] | None:
    ends = [e for e in inference_events(posts, request_id) if e["status"] in ("done", "error")]
    return ends[-1] if ends else None


class EventStream(threading.Thread):
    """Reads a job's server-sent events to their end, keeping the messages (name, data)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.messages: list[tuple[str, Any]] = []
        self.progressed = threading.Event()  # a progress event arrived: the job is running
        self.ended = False

    def run(self) -> None:
        with httpx.stream("GET", self.url, timeout=120) as response:
            name = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = json.loads(line.removeprefix("data: "))
                    self.messages.append((name, data))
                    if name == "event" and data["status"] == "progress":
                        self.progressed.set()
        self.ended = True


def submit(url: str, request_id: str, steps: int) -> EventStream:
    body = {"prompt": "a barn", "num_inference_steps": steps, "width": 32, "height": 32, "request_id": request_id,
            "callback_steps": 1}  # fmt: skip
    response = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    stream = EventStream(url + response.json()["events_url"])
    stream.start()
    return stream


def test_sigterm_drains_then_cancels_and_delivers_the_last_events(models_dir: Path, tmp_path: Path) -> None:
    with receiver() as hook:
        env = {"SEND_URL": hook.url, "DRAIN_TIMEOUT_S": str(DRAIN_S), "PROGRESS_INTERVAL_S": "0"}
        with serving(models_dir, tmp_path / "server.log", env) as server:
            long_job = submit(server.url, "long", LONG_STEPS)
            short_job = submit(server.url, "short", SHORT_STEPS)
            answers: list[httpx.Response] = []
            body = {"prompt": "a barn", "num_inference_steps": LONG_STEPS, "width": 32, "height": 32}
            request = threading.Thread(
                target=lambda: answers.append(httpx.post(f"{server.url}/v1/generate", json=body, timeout=120))
            )
            request.start()
            assert long_job.progressed.wait(60)
            assert short_job.progressed.wait(60)
            sent = time.time()
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=DRAIN_S + 30)
            took = time.time() - sent
            request.join(10)
            log = server.output()
        long_job.join(10)
        short_job.join(10)
        posts = list(hook.posts)  # the server has exited: whatever it delivered has arrived
    assert took >= DRAIN_S - 1, f"exited after {took:.1f} s, before the drain was over:\n{log[-3000:]}"
    assert took < DRAIN_S + 20, log[-3000:]
    # the short job ran on past SIGTERM, completed, and its webhook and event stream say so
    done = final(posts, "short")
    assert done is not None, inference_events(posts, "short")
    assert done["status"] == "done", inference_events(posts, "short")
    assert done["time"] / 1000 > sent
    assert short_job.ended
    assert short_job.messages[-1][1]["status"] == "COMPLETED"
    # the long job was cancelled at the end of the drain: its last webhook and its stream's final status say so
    cancelled = final(posts, "long")
    assert cancelled is not None, inference_events(posts, "long")
    assert cancelled["status"] == "error", inference_events(posts, "long")
    assert cancelled["payload"]["error"]["code"] == "CANCELLED"
    assert long_job.ended
    assert long_job.messages[-1][1]["status"] == "CANCELLED"
    # the synchronous request still running then was answered, in the error format
    assert len(answers) == 1
    assert answers[0].status_code == 409, answers[0].text
    assert answers[0].json()["error"]["code"] == "CANCELLED"
    assert "Application shutdown complete" in log


def test_sigterm_with_nothing_in_flight_exits_at_once(models_dir: Path, tmp_path: Path) -> None:
    with serving(models_dir, tmp_path / "server.log", {"DRAIN_TIMEOUT_S": "60"}) as server:
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
    assert time.monotonic() - sent < 10
    assert server.process.returncode in (0, -signal.SIGTERM)


def test_a_model_that_cannot_load_makes_serve_exit_with_the_reason(tmp_path: Path) -> None:
    port = free_port()
    with receiver() as hook:
        env = offline_env(tmp_path / "models", SEND_URL=hook.url)
        command = cli("serve", "--model", "nobody/no-such-model", "--host", "127.0.0.1", "--port", str(port))
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        posts = list(hook.posts)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("diffusers-api: the model could not be loaded, so the server stopped:"), last
    assert "nobody/no-such-model" in last
    # its init error reached the webhook before the process went
    assert [(e["type"], e["status"]) for e in (post.json() for post in posts)] == [("init", "start"), ("init", "error")]
