"""What the OpenAPI document says the routes answer: each error status with its body (`{"error": ...}` on /v1,
`{"$error": ...}` on the legacy API), the probes' bodies, and the links from a queued job to its other routes.

Every status a route can answer is listed, so that a client generated from the document (or schemathesis, in
tests/e2e/test_openapi_conformance.py) meets no status it was not told about. An unknown path (404
NOT_FOUND) and a wrong method (405 METHOD_NOT_ALLOWED) can happen anywhere and are in the README instead.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from ..schema import ErrorBody, ErrorResponse

Responses = dict[int | str, dict[str, Any]]

_WHEN = {
    401: "UNAUTHORIZED: API_KEY is set and the bearer token is missing or wrong",
    404: "MODEL_NOT_FOUND, MODEL_MISMATCH or NO_SUCH_PIPELINE: the model or pipeline asked for is not there",
    409: "CANCELLED: the request was cancelled (the server is shutting down and its drain ran out)",
    413: "PAYLOAD_TOO_LARGE: the body is over MAX_BODY_BYTES",
    422: "INVALID_INPUTS, INVALID_SCHEDULER or NO_MODEL_ID: the request is not valid; the message names the field",
    500: "PIPELINE_ERROR, MODEL_LOAD_ERROR or APP_INFERENCE_ERROR: the model or the server failed",
    502: "STORAGE_ERROR: a model download or upload failed",
    503: "NOT_READY (the model is loading, failed to load, or the device failed) or BUSY (the queue is full)",
}
# what an inference route can answer besides its result
INFERENCE_ERRORS = (401, 404, 409, 413, 422, 500, 502, 503)


class LegacyErrorResponse(BaseModel):
    """An error of `POST /`, under the key docker-diffusers-api used."""

    model_config = ConfigDict(populate_by_name=True)

    error: ErrorBody = Field(alias="$error")


class LegacyResponse(BaseModel):
    """The answer of `POST /`, as docker-diffusers-api wrote it."""

    model_config = ConfigDict(populate_by_name=True)

    image_base64: str | None = Field(None, description="The image, base64, when the request made one")
    images_base64: list[str] | None = Field(None, description="The images, base64, when it made several")
    nsfw_content_detected: list[bool] | None = Field(None, description="Per image, when the safety checker ran")
    meta: dict[str, Any] = Field(alias="$meta", description="MODEL_ID, PIPELINE, SCHEDULER, precision, seeds, ...")
    timings: dict[str, float] = Field(alias="$timings", description="Milliseconds per phase")
    mem_usage: float = Field(alias="$mem_usage", description="Device memory in use, 0..1 (0 on a CPU)")


class Health(BaseModel):
    """`GET /health`. The batching counters, compile progress and device memory come with the batching engine
    and a GPU (see the README's Health and operations)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["STARTING", "READY", "BUSY", "SETUP_FAILED", "DEFUNCT"]
    queue_depth: int = Field(description="Requests queued or running")
    error: str | None = Field(None, description="Why the model failed to load (SETUP_FAILED)")


class LegacyHealth(BaseModel):
    state: str = Field(description="healthy, or the lower-case state: starting, setup_failed, defunct")
    gpu: bool | None = Field(description="Whether a CUDA device is available; null while the model loads")


class Ping(BaseModel):
    status: str = Field(description="healthy, or the lower-case state: setup_failed, defunct")


def errors(*statuses: int, legacy: bool = False) -> Responses:
    """The error statuses of a route, each with its body and when it happens."""
    model = LegacyErrorResponse if legacy else ErrorResponse
    return {status: {"model": model, "description": _WHEN[status]} for status in statuses}


# A 200 that may also be NDJSON (`stream_events`): events and progress, then the result as the last line.
NDJSON = {"application/x-ndjson": {"schema": {"type": "string", "description": "one JSON object per line"}}}


def _job_link(method: str, path: str, description: str) -> dict[str, Any]:
    pointer = path.replace("/", "~1")
    return {
        "operationRef": f"#/paths/{pointer}/{method}",
        "parameters": {"job_id": "$response.body#/id"},
        "description": description,
    }


JOB_LINKS = {
    "GetJob": _job_link("get", "/v1/jobs/{job_id}", "The job's status, progress and result"),
    "CancelJob": _job_link("delete", "/v1/jobs/{job_id}", "Cancel the job"),
    "JobEvents": _job_link("get", "/v1/jobs/{job_id}/events", "The job's server-sent events"),
}


BEARER = "APIKey"


def declare_api_key(app: FastAPI) -> None:
    """With API_KEY set, the document names the bearer scheme and puts it on every operation that can answer 401,
    so that Swagger UI (/docs) shows its Authorize button and "Try it out" sends the key, and a generated client
    knows to. The probes and pages, which need no key, stay without it. (FastAPI's documented way to extend the
    document: replace `app.openapi`, which builds and caches it.)"""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_bearer(build())
        return app.openapi_schema  # type: ignore[return-value]  # set by build()

    app.openapi = openapi  # type: ignore[method-assign]


def _add_bearer(document: dict[str, Any]) -> None:
    scheme = {"type": "http", "scheme": "bearer", "description": "The server's API_KEY"}
    document.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = scheme
    for operations in document["paths"].values():
        for operation in operations.values():
            if "401" in operation.get("responses", {}):
                operation["security"] = [{BEARER: []}]
