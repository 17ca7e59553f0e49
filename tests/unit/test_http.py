"""The HTTP layer over a fake engine: routing, envelopes, errors, auth, limits, health."""

from __future__ import annotations

import base64
import io
import json
import sys
import types
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffusers_api.engine import Health
from diffusers_api.errors import Busy, ModelMismatch, NoSuchPipeline, PipelineError
from support.apps import make_client
from support.envelopes import GRASS
from support.fakes import FakeEngine


def test_legacy_request_returns_an_image_and_meta(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/", json=GRASS)
    assert response.status_code == 200
    body = response.json()
    assert base64.b64decode(body["image_base64"]).startswith(b"\x89PNG")
    assert body["$meta"]["MODEL_ID"] == "builtin/tiny-sd"
    assert "inference" in body["$timings"]
    assert engine.requests[0].prompt == "realistic field of grass"


def test_legacy_double_encoded_body(client: TestClient) -> None:
    response = client.post("/", content=json.dumps(json.dumps(GRASS)), headers={"content-type": "application/json"})
    assert response.status_code == 200


def test_legacy_several_images(client: TestClient) -> None:
    envelope = {"modelInputs": {"prompt": "x", "num_images_per_prompt": 2}, "callInputs": {}}
    body = client.post("/", json=envelope).json()
    assert len(body["images_base64"]) == 2


def test_missing_envelope_key_is_invalid_inputs(client: TestClient) -> None:
    response = client.post("/", json={"modelInputs": {}})
    assert response.status_code == 422
    assert response.json()["$error"]["code"] == "INVALID_INPUTS"
    assert "callInputs" in response.json()["$error"]["message"]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (NoSuchPipeline("nope", requested="X", available=["txt2img"]), 404, "NO_SUCH_PIPELINE"),
        (ModelMismatch("other", requested="a", available=["b"]), 404, "MODEL_MISMATCH"),
        (Busy("full"), 503, "BUSY"),
        (PipelineError("boom"), 500, "PIPELINE_ERROR"),
    ],
    ids=["no-such-pipeline", "model-mismatch", "busy", "pipeline-error"],
)
def test_engine_errors_keep_their_code_and_status(
    engine: FakeEngine, client: TestClient, error: Exception, status: int, code: str
) -> None:
    engine.fail_with = error  # type: ignore[assignment]
    legacy = client.post("/", json=GRASS)
    native = client.post("/v1/generate", json={"prompt": "x"})
    assert legacy.status_code == native.status_code == status
    assert legacy.json()["$error"]["code"] == native.json()["error"]["code"] == code
    assert "stack" not in legacy.json()["$error"]


def test_extra_error_fields_reach_the_client(engine: FakeEngine, client: TestClient) -> None:
    engine.fail_with = NoSuchPipeline("nope", requested="X", available=["txt2img", "img2img"])
    error = client.post("/", json=GRASS).json()["$error"]
    assert error["requested"] == "X"
    assert error["available"] == ["txt2img", "img2img"]


def test_debug_adds_the_stack(engine: FakeEngine) -> None:
    engine.fail_with = PipelineError("boom")
    try:
        raise engine.fail_with
    except PipelineError:
        pass
    with make_client(engine, debug=True) as debug_client:
        assert "stack" in debug_client.post("/", json=GRASS).json()["$error"]


def raised_from(cause: Exception) -> PipelineError:
    """A PipelineError as the runner raises it over an exception of the pipeline: with a traceback and a cause."""
    try:
        try:
            raise cause
        except Exception as exc:
            raise PipelineError(f"{type(exc).__name__}: {exc}") from exc
    except PipelineError as error:
        return error


def test_errors_name_what_failed_and_debug_adds_its_stack(engine: FakeEngine, client: TestClient) -> None:
    engine.fail_with = raised_from(RuntimeError("the pipeline broke"))
    legacy = client.post("/", json=GRASS).json()["$error"]
    native = client.post("/v1/generate", json={"prompt": "x"}).json()["error"]
    assert legacy["name"] == native["name"] == "RuntimeError"  # as the original server named it: type(err)
    assert list(legacy)[:3] == ["code", "name", "message"]
    assert "stack" not in legacy
    engine.fail_with = NoSuchPipeline("nope", requested="X", available=["txt2img"])
    assert client.post("/", json=GRASS).json()["$error"]["name"] == "NoSuchPipeline"
    engine.fail_with = raised_from(RuntimeError("the pipeline broke"))
    with make_client(engine, debug=True) as debug_client:
        stack = debug_client.post("/", json=GRASS).json()["$error"]["stack"]
    assert "RuntimeError: the pipeline broke" in stack


def test_native_generate_json(client: TestClient) -> None:
    response = client.post("/v1/generate", json={"prompt": "x", "seed": 5, "num_images_per_prompt": 2})
    assert response.status_code == 200
    images = response.json()["images"]
    assert [image["seed"] for image in images] == [5, 6]
    assert images[0]["format"] == "png"


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("image/png", "image/png"),
        ("image/jpeg", "image/jpeg"),
        ("image/webp, */*;q=0.1", "image/webp"),
        ("image/jxl", "image/jxl"),
    ],
    ids=["png", "jpeg", "webp", "jxl"],
)
def test_native_generate_image_bytes(client: TestClient, engine: FakeEngine, accept: str, media_type: str) -> None:
    response = client.post("/v1/generate", json={"prompt": "x", "seed": 3}, headers={"accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["x-seed"] == "3"
    assert engine.requests[-1].image_format == media_type.split("/")[1].upper()
    # the body is the image itself, in the format asked for
    assert Image.open(io.BytesIO(response.content)).format == media_type.split("/")[1].upper()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "JXL"])
def test_legacy_image_format_reaches_the_body(client: TestClient, image_format: str) -> None:
    envelope = {"modelInputs": {"prompt": "x"}, "callInputs": {"image_format": image_format}}
    body = client.post("/", json=envelope).json()
    assert body["$meta"]["image_format"] == image_format
    assert Image.open(io.BytesIO(base64.b64decode(body["image_base64"]))).format == image_format


def test_image_accept_with_several_images_is_refused(client: TestClient) -> None:
    response = client.post(
        "/v1/generate", json={"prompt": "x", "num_images_per_prompt": 2}, headers={"accept": "image/png"}
    )
    assert response.status_code == 422
    assert "one image" in response.json()["error"]["message"]


def test_native_validation_errors_use_our_format(client: TestClient) -> None:
    response = client.post("/v1/generate", json={"width": 13, "unknown": True})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "INVALID_INPUTS"
    assert "width" in error["message"]
    assert "unknown" in error["message"]


def test_api_key(engine: FakeEngine) -> None:
    with make_client(engine, api_key="s3cret") as secured:
        assert secured.post("/", json=GRASS).status_code == 401
        wrong = secured.post("/", json=GRASS, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["$error"]["code"] == "UNAUTHORIZED"
        assert secured.post("/v1/generate", json={}).status_code == 401
        ok = secured.post("/", json=GRASS, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert secured.get("/health").status_code == 200  # probes stay open


def test_with_an_api_key_the_document_names_the_bearer_scheme_where_it_is_needed(
    engine: FakeEngine, client: TestClient
) -> None:
    assert "security" not in client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]
    with make_client(engine, api_key="s3cret") as secured:
        spec = secured.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The server's API_KEY",
    }
    needs_key = {path for path, ops in spec["paths"].items() for op in ops.values() if "security" in op}
    assert {"/", "/v1/generate", "/v1/jobs", "/metrics"} <= needs_key
    assert not needs_key & {"/health", "/ping", "/healthcheck"}


def test_body_limit(engine: FakeEngine) -> None:
    with make_client(engine, max_body_bytes=2048) as limited:
        big = {"modelInputs": {"prompt": "x" * 4096}, "callInputs": {}}
        response = limited.post("/", json=big)
        assert response.status_code == 413
        assert response.json()["$error"]["code"] == "PAYLOAD_TOO_LARGE"

        def chunks() -> Iterator[bytes]:
            yield b'{"prompt": "'
            yield b"y" * 4096
            yield b'"}'

        chunked = limited.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert chunked.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert engine.requests == []


@pytest.mark.parametrize(
    ("state", "health_status", "ping_status", "healthcheck_status"),
    [
        (Health.STARTING, 503, 204, 503),
        (Health.READY, 200, 200, 200),
        (Health.BUSY, 200, 200, 200),
        (Health.SETUP_FAILED, 503, 503, 503),
    ],
    ids=lambda v: str(v),
)
def test_health_endpoints(
    engine: FakeEngine,
    client: TestClient,
    state: Health,
    health_status: int,
    ping_status: int,
    healthcheck_status: int,
) -> None:
    engine.health = state
    assert client.get("/health").status_code == health_status
    assert client.get("/health").json()["status"] == state.value
    assert client.get("/ping").status_code == ping_status
    assert client.get("/healthcheck").status_code == healthcheck_status


def test_probes_leave_a_half_imported_torch_alone(
    engine: FakeEngine, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers while the engine's thread imports torch (tests/unit/test_startup.py): a probe must not
    touch the half-made module, nor import torch on the event loop (that would wait for the whole import)."""
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # mid-import: no `cuda` yet
    engine.health = Health.STARTING
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "STARTING"
    check = client.get("/healthcheck")
    assert check.status_code == 503
    assert check.json() == {"state": "starting", "gpu": None}


def test_setup_error_is_reported(engine: FakeEngine, client: TestClient) -> None:
    engine.health, engine.setup_error = Health.SETUP_FAILED, "model x not found"
    assert client.get("/health").json()["error"] == "model x not found"


def test_openapi_documents_both_apis(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/generate" in spec["paths"]
    assert "/" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_cors(engine: FakeEngine) -> None:
    with make_client(engine, cors_origins="https://app.example") as cors_client:
        preflight = cors_client.options(
            "/v1/generate",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = cors_client.get("/health", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_lifespan_starts_the_engine(engine: FakeEngine, client: TestClient) -> None:
    assert engine.started
