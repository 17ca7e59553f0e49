"""Every error the server sends is in the project's format with a code, including those Starlette and FastAPI
make themselves (no route, a wrong method, a body that cannot be read), and DEBUG adds the stack everywhere."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from diffusers_api.errors import PipelineError
from support.apps import make_client
from support.fakes import FakeEngine

NOT_UTF8 = b'{"prompt": "\xff\xfe a barn"}'


def error_of(path: str, body: dict[str, object]) -> dict[str, object]:
    """The error object, under the key of the path's API: `error` on /v1, `$error` elsewhere."""
    key = "error" if path.startswith("/v1") else "$error"
    assert set(body) == {key}, body
    error = body[key]
    assert isinstance(error, dict)
    return error


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/jobs", "/"])
def test_a_body_that_is_not_utf8_is_invalid_inputs(client: TestClient, path: str) -> None:
    response = client.post(path, content=NOT_UTF8, headers={"content-type": "application/json"})
    assert response.status_code == 422
    error = error_of(path, response.json())
    assert error["code"] == "INVALID_INPUTS"
    assert str(error["message"]).startswith("request body is not valid JSON")


# JSON that json.loads fails on without a JSONDecodeError: nested past the recursion limit (a RecursionError), an
# integer past Python's 4300 digits (a ValueError); POST / and /v1/train read their bodies themselves.
UNLOADABLE = {"deep": b"[" * 100_000 + b"]" * 100_000, "huge-int": b'{"seed": ' + b"9" * 5000 + b"}"}


@pytest.mark.parametrize("body", UNLOADABLE.values(), ids=UNLOADABLE.keys())
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/jobs", "/v1/train", "/"])
def test_json_that_does_not_load_is_invalid_inputs(client: TestClient, path: str, body: bytes) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    error = error_of(path, response.json())
    assert error["code"] == "INVALID_INPUTS"
    assert str(error["message"]).startswith("request body is not valid JSON")


def test_a_string_of_json_too_deep_is_invalid_inputs(client: TestClient) -> None:
    kwargs = "[" * 100_000 + "]" * 100_000
    response = client.post("/v1/generate", json={"prompt": "x", "cross_attention_kwargs": kwargs})
    assert response.status_code == 422
    assert "cross_attention_kwargs: Value error, the string is not valid JSON" in response.json()["error"]["message"]


# Half a surrogate pair, as JSON can escape it: Python reads it into a string that UTF-8 cannot encode.
LONE = "\\ud800"
SURROGATES = {
    "/v1/generate": f'{{"prompt": "x", "scheduler": "a{LONE}"}}',
    "/v1/jobs": f'{{"prompt": "x", "extra": {{"{LONE}": 1}}}}',
    "/v1/upscale": f'{{"image": "aGk=", "model": "{LONE}"}}',
    "/v1/train": f'{{"instance_images": ["aGk="], "instance_prompt": "{LONE}", "name": "x"}}',
    "/": f'{{"modelInputs": {{"prompt": "x"}}, "callInputs": {{"{LONE}": 1}}}}',
}


@pytest.mark.parametrize(("path", "body"), SURROGATES.items(), ids=SURROGATES.keys())
def test_a_lone_surrogate_is_invalid_inputs_naming_where(client: TestClient, path: str, body: str) -> None:
    """Echoed in an error message (an unknown scheduler, input or call input) it made that response a 500
    (UnicodeEncodeError), and the connection was dropped; tokenizers refused it with a TypeError."""
    response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422
    message = str(error_of(path, response.json())["message"])
    assert "not valid Unicode (a lone surrogate, \\ud800); send UTF-8 text" in message


@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/v1/jobs/a/b/c", "/ui/static/nope.js"])
def test_an_unknown_route_is_not_found(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    error = error_of(path, response.json())
    assert error["code"] == "NOT_FOUND"
    assert path in str(error["message"])


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/", ["GET", "POST"]),  # the playground and the legacy API share the path
        ("GET", "/v1/generate", ["POST"]),
        ("POST", "/health", ["GET"]),
        ("PATCH", "/v1/jobs/abc", ["DELETE", "GET"]),
    ],
    ids=["root", "generate", "health", "job"],
)
def test_a_wrong_method_is_method_not_allowed(client: TestClient, method: str, path: str, allowed: list[str]) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    error = error_of(path, response.json())
    assert error["code"] == "METHOD_NOT_ALLOWED"
    assert error["allowed"] == allowed
    assert response.headers["allow"] == ", ".join(allowed)


def failing_engine() -> FakeEngine:
    """An engine whose requests fail with a PipelineError that was raised (so it has a stack)."""
    try:
        raise PipelineError("the pipeline broke")
    except PipelineError as error:
        return FakeEngine(fail_with=error)


def test_debug_adds_the_stack_to_a_streamed_error() -> None:
    with make_client(failing_engine(), debug=True) as client:
        native = client.post("/v1/generate", json={"prompt": "x", "stream_events": True})
        legacy = client.post("/", json={"modelInputs": {"prompt": "x"}, "callInputs": {"streamEvents": True}})
    assert "the pipeline broke" in json.loads(native.text.splitlines()[-1])["error"]["stack"]
    assert "the pipeline broke" in json.loads(legacy.text.splitlines()[-1])["$error"]["stack"]


def test_debug_adds_the_stack_to_a_failed_job() -> None:
    with make_client(failing_engine(), debug=True) as client:
        job_id = client.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
        deadline = time.monotonic() + 10
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] != "FAILED":
            assert time.monotonic() < deadline, job
            time.sleep(0.01)
    assert job["error"]["name"] == "PipelineError"
    assert "the pipeline broke" in job["error"]["stack"]


def test_without_debug_no_stack_anywhere(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_with = failing_engine().fail_with
    streamed = client.post("/v1/generate", json={"prompt": "x", "stream_events": True})
    assert "stack" not in json.loads(streamed.text.splitlines()[-1])["error"]
