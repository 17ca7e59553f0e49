"""Where a request goes: a server's `POST /` (`Client`), its `/v1/jobs` (`JobsClient`), or a RunPod endpoint
(`RunPodClient`); each answers a `Reply`."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .base import TERMINAL_STATES, ClientError, Envelope

# Sent with each of a job's calls, one value per job: behind Ray Serve (diffusers_api.ray), whose router sends one
# session to one replica, they all reach the replica that holds the job. A single server ignores it.
SESSION_HEADER = "X-Session-Id"


@dataclass
class Reply:
    """A finished request: the legacy response body and how long it took end to end."""

    body: dict[str, Any]
    seconds: float
    events: list[dict[str, Any]] = field(default_factory=list)  # the streamed events, with streamEvents

    @property
    def images(self) -> list[bytes]:
        encoded = self.body.get("images_base64") or [self.body["image_base64"]]
        return [base64.b64decode(item) for item in encoded]

    @property
    def timings(self) -> dict[str, Any]:
        timings: dict[str, Any] = self.body.get("$timings", {})
        return timings


class Client:
    """Sends envelopes to a diffusers-api server's `POST /`."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s

    @property
    def target(self) -> str:
        return self.url

    def send(self, envelope: Envelope) -> Reply:
        started = time.perf_counter()
        try:
            response = httpx.post(self.url, json=envelope, headers=self.headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise ClientError(f"could not reach {self.url}: {exc}") from None
        events: list[dict[str, Any]] = []
        if response.headers.get("content-type", "").startswith("application/x-ndjson"):
            *events, body = _ndjson_lines(response)  # callInputs.streamEvents: events, then the body last
        else:
            body = _json_body(response)
        if "$error" in body:
            error = body["$error"]
            raise ClientError(f"{error.get('code')}: {error.get('message')} (HTTP {response.status_code})")
        return Reply(body, time.perf_counter() - started, events)


@dataclass
class RunPodClient:
    """Submits envelopes as RunPod jobs (`POST {endpoint}/run`) and polls `{endpoint}/status/{id}` until the job
    is COMPLETED, FAILED, CANCELLED or TIMED_OUT, or `timeout_s` passes."""

    base_url: str
    endpoint_id: str | None = None
    api_key: str | None = None
    timeout_s: float = 600
    poll_interval_s: float = 1.0
    seen_states: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"{self.endpoint}/run"

    @property
    def endpoint(self) -> str:
        base = self.base_url.rstrip("/")
        return f"{base}/{self.endpoint_id}" if self.endpoint_id else base

    def send(self, envelope: Envelope) -> Reply:
        started = time.perf_counter()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(headers=headers, timeout=self.timeout_s) as http:
            job_id = self._submit(http, envelope)
            final = self._wait(http, job_id, started + self.timeout_s)
        return Reply(_job_output(final, job_id), time.perf_counter() - started)

    def _submit(self, http: httpx.Client, envelope: Envelope) -> str:
        body = _json_body(_call(http, "POST", f"{self.endpoint}/run", json={"input": envelope}))
        if "id" not in body:
            raise ClientError(f"{self.endpoint}/run answered without a job id: {body}")
        return str(body["id"])

    def _wait(self, http: httpx.Client, job_id: str, deadline: float) -> dict[str, Any]:
        while True:
            status = self._status(http, job_id)
            self.seen_states.append(str(status.get("status")))
            if status.get("status") in TERMINAL_STATES:
                return status
            if time.perf_counter() >= deadline:
                raise ClientError(f"job {job_id} still {status.get('status')} after {self.timeout_s:g} s; gave up")
            time.sleep(self.poll_interval_s)

    def _status(self, http: httpx.Client, job_id: str) -> dict[str, Any]:
        url = f"{self.endpoint}/status/{job_id}"
        response = _call(http, "GET", url)
        if response.status_code == 405:  # the runpod SDK's local API server serves /status as POST only
            response = _call(http, "POST", url)
        return _json_body(response)


@dataclass
class JobsClient:
    """Sends envelopes as jobs of a diffusers-api server: the native request to `POST {url}/v1/jobs`, then
    `GET /v1/jobs/{id}` until it ends, reporting each new step to `on_progress`. A job still running at the
    timeout, or when the caller is interrupted, is cancelled (`DELETE`) rather than left to run. Each job's calls
    carry one `X-Session-Id`, so that Ray Serve routes them all to the replica that holds the job."""

    url: str
    api_key: str | None = None
    timeout_s: float = 600
    poll_interval_s: float = 0.25
    on_progress: Callable[[dict[str, Any]], None] | None = None

    @property
    def target(self) -> str:
        return f"{self.url.rstrip('/')}/v1/jobs"

    def send(self, envelope: Envelope) -> Reply:
        started = time.perf_counter()
        body = _native_body(envelope)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        headers[SESSION_HEADER] = uuid.uuid4().hex
        with httpx.Client(headers=headers, timeout=min(self.timeout_s, 60)) as http:
            created = _json_body(_call(http, "POST", self.target, json=body))
            job_id = str(created["id"])
            try:
                final = self._follow(http, job_id, started + self.timeout_s)
            except BaseException:  # a timeout, Ctrl-C: the server should not go on working for nobody
                with contextlib.suppress(ClientError):
                    _call(http, "DELETE", f"{self.target}/{job_id}")
                raise
        if final["status"] != "COMPLETED":
            error = final.get("error") or {}
            raise ClientError(f"job {job_id} ended {final['status']}: {error.get('code')}: {error.get('message')}")
        result = final["result"]
        legacy = {
            "images_base64": [image["data"] for image in result["images"]],
            "$meta": result["meta"],
            "$timings": result["timings"],
            "$mem_usage": result.get("mem_usage", 0.0),
        }
        return Reply(legacy, time.perf_counter() - started)

    def _follow(self, http: httpx.Client, job_id: str, deadline: float) -> dict[str, Any]:
        reported: tuple[Any, ...] | None = None
        while True:
            status = _json_body(_call(http, "GET", f"{self.target}/{job_id}"))
            progress = status.get("progress", {})
            seen = (status["status"], progress.get("stage"), progress.get("step"))
            if self.on_progress is not None and seen != reported:
                self.on_progress(status)
                reported = seen
            if status["status"] in TERMINAL_STATES:
                return status
            if time.perf_counter() >= deadline:
                raise ClientError(f"job {job_id} still {status['status']} after {self.timeout_s:g} s; cancelled it")
            time.sleep(self.poll_interval_s)


def _native_body(envelope: Envelope) -> dict[str, Any]:
    """The envelope as a native request (`/v1`), as the server itself translates it."""
    from ..errors import DiffusersAPIError
    from ..schema import from_legacy

    try:
        request = from_legacy(envelope)
    except DiffusersAPIError as exc:
        raise ClientError(f"{exc.code}: {exc.message}") from None
    if request.stream_events:
        raise ClientError("streamEvents does not apply to jobs: their progress is followed instead")
    body = request.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    if request.sign_key is not None:
        body["sign_key"] = request.sign_key.get_secret_value()  # dumped masked otherwise
    return body


def _call(http: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        return http.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise ClientError(f"could not reach {url}: {exc}") from None


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise ClientError(f"HTTP {response.status_code}, not JSON: {response.text[:300]}") from None
    if not isinstance(body, dict):
        raise ClientError(f"HTTP {response.status_code}: expected a JSON object, got {body!r:.300}")
    if response.status_code >= 400 and "$error" not in body:
        error = body.get("error")  # the native API's error body
        if isinstance(error, dict):
            raise ClientError(f"{error.get('code')}: {error.get('message')} (HTTP {response.status_code})")
        raise ClientError(f"HTTP {response.status_code}: {body}")
    return body


def _ndjson_lines(response: httpx.Response) -> list[dict[str, Any]]:
    try:
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    except ValueError:
        raise ClientError(f"HTTP {response.status_code}: a line of the NDJSON stream is not JSON") from None
    if not lines or not isinstance(lines[-1], dict):
        raise ClientError(f"HTTP {response.status_code}: the NDJSON stream ended without a result")
    return lines


def _job_output(final: dict[str, Any], job_id: str) -> dict[str, Any]:
    state = final.get("status")
    if state != "COMPLETED":
        reason = final.get("error") or "no error message"
        raise ClientError(f"job {job_id} ended {state}: {reason}")
    output = final.get("output")
    if not isinstance(output, dict):
        raise ClientError(f"job {job_id} COMPLETED without an output object: {output!r:.300}")
    return output
