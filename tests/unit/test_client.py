"""The client: named tests, value coercion, and --runpod against a small fake /run + /status server."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffusers_api.cli import main
from diffusers_api.client import TESTS, ClientError, RunPodClient, build_test, coerce, parse_pairs, run_tests
from support.fakes import png_bytes


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("False", False), ("20", 20), ("-3", -3), ("7.5", 7.5), ("1e-3", 0.001), ("Euler a", "Euler a")],
)
def test_values_are_coerced_to_what_they_look_like(text: str, value: object) -> None:
    assert coerce(text) == value
    assert type(coerce(text)) is type(value)


def test_pairs_parse_and_a_bad_pair_is_named() -> None:
    assert parse_pairs(["width=64", "safety_checker=false", "prompt=a=b"]) == {
        "width": 64,
        "safety_checker": False,
        "prompt": "a=b",
    }
    with pytest.raises(ClientError, match="expected KEY=VALUE, got 'width'"):
        parse_pairs(["width"])


def _size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return image.size


def test_image_tests_draw_their_inputs_at_the_requested_size() -> None:
    envelope = build_test("inpaint", {"width": 64, "height": 48}, {"MODEL_ID": "builtin/tiny-sd-inpaint"})
    assert _size(envelope["modelInputs"]["image"]) == (64, 48)
    assert _size(envelope["modelInputs"]["mask_image"]) == (64, 48)
    assert envelope["callInputs"] == {"PIPELINE": "inpaint", "MODEL_ID": "builtin/tiny-sd-inpaint"}
    assert "width" not in envelope["modelInputs"]
    assert "image" not in build_test("txt2img")["modelInputs"]


def test_every_named_test_builds_a_valid_envelope() -> None:
    from diffusers_api.schema import from_legacy

    for name in TESTS:
        from_legacy(build_test(name, {"width": 64, "height": 64}))


def test_an_unknown_test_is_named() -> None:
    with pytest.raises(ClientError, match="no test named nope"):
        run_tests(["nope"])


# --- a fake RunPod endpoint -------------------------------------------------------------------------------------


@dataclass
class FakeRunPod:
    """POST /run queues a job; GET /status/{id} walks it through `states`, the last one being final."""

    states: list[dict[str, Any]]
    url: str = ""
    submitted: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    polls: int = 0


@contextmanager
def fake_runpod(states: list[dict[str, Any]]) -> Iterator[FakeRunPod]:
    fake = FakeRunPod(states)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            fake.submitted.append(body)
            fake.auth.append(self.headers.get("authorization"))
            fake.paths.append(self.path)
            self._answer({"id": "job-7", "status": "IN_QUEUE"})

        def do_GET(self) -> None:
            assert self.path.endswith("/status/job-7")
            state = fake.states[min(fake.polls, len(fake.states) - 1)]
            fake.polls += 1
            self._answer({"id": "job-7", **state})

        def _answer(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v2"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


IMAGE = base64.b64encode(png_bytes()).decode()
DONE = {"status": "COMPLETED", "output": {"image_base64": IMAGE, "$timings": {"inference": 12.5}}}


def test_runpod_mode_polls_until_completed_and_saves_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_runpod([{"status": "IN_QUEUE"}, {"status": "IN_PROGRESS"}, DONE]) as fake:
        monkeypatch.setenv("RUNPOD_BASE_URL", fake.url)
        monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "ep-1")
        monkeypatch.setenv("RUNPOD_API_KEY", "rp-key")
        code = main(
            ["client", "txt2img", "--runpod", "--model-arg", "num_inference_steps=2", "--output-dir", str(tmp_path)]
        )
    assert code == 0
    assert (tmp_path / "txt2img.png").read_bytes() == png_bytes()
    assert fake.submitted[0]["input"]["modelInputs"]["num_inference_steps"] == 2
    assert fake.paths == ["/v2/ep-1/run"]
    assert fake.auth == ["Bearer rp-key"]
    assert fake.polls == 3
    out = capsys.readouterr().out
    assert "request took" in out
    assert '"inference": 12.5' in out


def test_runpod_mode_stops_with_the_error_on_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = {"status": "FAILED", "error": "INVALID_INPUTS: width: Input should be a multiple of 8"}
    with fake_runpod([{"status": "IN_PROGRESS"}, failed]) as fake:
        code = main(["client", "--runpod", "--endpoint", f"{fake.url}/ep-2", "--output-dir", str(tmp_path)])
    assert code == 1
    assert fake.paths == ["/v2/ep-2/run"]  # an endpoint given as a URL is used as it is
    assert fake.polls == 2
    err = capsys.readouterr().err
    assert "job job-7 ended FAILED: INVALID_INPUTS: width: Input should be a multiple of 8" in err
    assert not list(tmp_path.iterdir())


def test_the_endpoint_flag_names_an_endpoint_under_the_base_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_runpod([DONE]) as fake:
        monkeypatch.setenv("RUNPOD_BASE_URL", fake.url)
        monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "from-the-environment")
        code = main(["client", "--runpod", "--endpoint", "ep-9", "--output-dir", str(tmp_path)])
    assert code == 0
    assert fake.paths == ["/v2/ep-9/run"]


def test_runpod_mode_without_an_endpoint_is_an_error_not_a_post(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_runpod([DONE]) as fake:
        monkeypatch.setenv("RUNPOD_BASE_URL", fake.url)
        monkeypatch.delenv("RUNPOD_ENDPOINT_ID", raising=False)
        code = main(["client", "--runpod"])
    assert code == 1
    assert "--runpod needs an endpoint: --endpoint ID (or RUNPOD_ENDPOINT_ID)" in capsys.readouterr().err
    assert fake.paths == []


def test_the_endpoint_flag_goes_with_runpod(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "--endpoint", "ep-9"]) == 1
    assert "--endpoint names a RunPod endpoint: it goes with --runpod" in capsys.readouterr().err


@pytest.mark.parametrize("state", ["CANCELLED", "TIMED_OUT"])
def test_runpod_mode_stops_on_other_final_states(state: str) -> None:
    with fake_runpod([{"status": state}]) as fake, pytest.raises(ClientError, match=f"ended {state}"):
        RunPodClient(fake.url, poll_interval_s=0.01).send(build_test("txt2img"))


def test_runpod_mode_gives_up_after_its_timeout() -> None:
    with fake_runpod([{"status": "IN_PROGRESS"}]) as fake:
        client = RunPodClient(fake.url, timeout_s=0.3, poll_interval_s=0.05)
        with pytest.raises(ClientError, match=r"still IN_PROGRESS after 0\.3 s; gave up"):
            client.send(build_test("txt2img"))


def test_an_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["client", "--url", "http://127.0.0.1:9/", "--timeout", "2"])
    assert code == 1
    assert "could not reach http://127.0.0.1:9/" in capsys.readouterr().err


def test_a_job_carries_the_native_request_with_its_secrets() -> None:
    from diffusers_api.client.transports import _native_body

    envelope = {
        "modelInputs": {"prompt": "a barn", "num_inference_steps": 4, "init_image": "aGk="},
        "callInputs": {"SCHEDULER": "Euler a", "SIGN_KEY": "k", "startRequestId": "r1"},
    }
    assert _native_body(envelope) == {
        "prompt": "a barn",
        "num_inference_steps": 4,
        "image": "aGk=",
        "scheduler": "Euler a",
        "sign_key": "k",
        "request_id": "r1",
    }
    with pytest.raises(ClientError, match="streamEvents"):
        _native_body({"modelInputs": {"prompt": "p"}, "callInputs": {"streamEvents": True}})
    with pytest.raises(ClientError, match="INVALID_INPUTS"):
        _native_body({"modelInputs": {"prompt": "p"}})
