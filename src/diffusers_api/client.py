"""The Python client: named test requests, sent to a server (`POST /`, or as jobs: `POST /v1/jobs`, then
`GET /v1/jobs/{id}` until the job ends) or to a RunPod endpoint (`/run`, then `/status/{id}` until the job
ends), with the images saved to a folder. `diffusers-api client` is its CLI; the
end-to-end tests use it too. `verify_webhook` checks the signature of a webhook this server sent.

    from diffusers_api.client import Client, build_test
    response = Client("http://localhost:8000/").send(build_test("txt2img"))
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .events import verify_signature

Envelope = dict[str, Any]
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


class ClientError(Exception):
    """A request that did not produce images: the server's error, a failed job, or a timeout."""


class ClientSettings(BaseSettings):
    """Where the client sends requests, from the environment (flags override)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True)

    test_url: str = "http://localhost:8000/"  # server for plain requests
    runpod_base_url: str = "https://api.runpod.ai/v2"  # RunPod's API, or a local stand-in
    runpod_endpoint_id: str | None = None
    runpod_api_key: SecretStr | None = None


# --- named tests -----------------------------------------------------------------------------------------------


def _png_base64(width: int, height: int, draw: Callable[[Any], None]) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (40, 90, 160))
    draw(ImageDraw.Draw(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _scene(width: int, height: int) -> str:
    """A sky, a field and a sun: an input image made in code, so that no binary fixture is needed."""

    def draw(canvas: Any) -> None:
        canvas.rectangle((0, height * 2 // 3, width, height), fill=(60, 140, 50))
        canvas.ellipse((width // 8, height // 8, width // 3, height // 3), fill=(250, 210, 60))

    return _png_base64(width, height, draw)


def _mask(width: int, height: int) -> str:
    """Black, with a white square in the middle: the part an inpainting model repaints."""

    def draw(canvas: Any) -> None:
        canvas.rectangle((0, 0, width, height), fill=(0, 0, 0))
        canvas.rectangle((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(255, 255, 255))

    return _png_base64(width, height, draw)


_PROMPT = "realistic field of grass"
TESTS: dict[str, dict[str, Any]] = {
    "txt2img": {"modelInputs": {"prompt": _PROMPT}, "callInputs": {}},
    "txt2img-multiple": {"modelInputs": {"prompt": _PROMPT, "num_images_per_prompt": 2}, "callInputs": {}},
    "txt2img-euler-a": {"modelInputs": {"prompt": _PROMPT}, "callInputs": {"SCHEDULER": "Euler a"}},
    "txt2img-jpeg": {"modelInputs": {"prompt": _PROMPT}, "callInputs": {"image_format": "JPEG"}},
    "img2img": {
        "modelInputs": {"prompt": "a sunny meadow, oil painting", "strength": 0.75},
        "callInputs": {"PIPELINE": "img2img"},
    },
    "inpaint": {
        "modelInputs": {"prompt": "a red barn in a field"},
        "callInputs": {"PIPELINE": "inpaint"},
    },
}
_NEEDS_IMAGE = {"img2img", "inpaint"}
_NEEDS_MASK = {"inpaint"}


def build_test(
    name: str, model_args: Mapping[str, Any] | None = None, call_args: Mapping[str, Any] | None = None
) -> Envelope:
    """The legacy envelope of test `name` with the overrides laid over it. Input images are drawn at the
    requested width x height (512 x 512 by default), which then leave the request."""
    if name not in TESTS:
        raise ClientError(f"no test named {name!r}; known: {', '.join(TESTS)}")
    model_inputs = {**TESTS[name]["modelInputs"], **(model_args or {})}
    call_inputs = {**TESTS[name]["callInputs"], **(call_args or {})}
    if name in _NEEDS_IMAGE:
        # img2img and inpaint pipelines take their size from the input image, not from width / height
        width, height = int(model_inputs.pop("width", 512)), int(model_inputs.pop("height", 512))
        if "image" not in model_inputs:
            model_inputs["image"] = _scene(width, height)
        if name in _NEEDS_MASK and "mask_image" not in model_inputs:
            model_inputs["mask_image"] = _mask(width, height)
    return {"modelInputs": model_inputs, "callInputs": call_inputs}


def coerce(value: str) -> bool | int | float | str:
    """A command-line value as the type it looks like: true/false, an int, a float, else the string."""
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def parse_pairs(pairs: list[str] | None) -> dict[str, Any]:
    """`["K=V", ...]` -> `{K: coerce(V)}`; a pair without `=` is a ClientError naming it."""
    parsed: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"expected KEY=VALUE, got {pair!r}")
        parsed[key] = coerce(value)
    return parsed


# --- transports ------------------------------------------------------------------------------------------------


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
    timeout, or when the caller is interrupted, is cancelled (`DELETE`) rather than left to run."""

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
    from .errors import DiffusersAPIError
    from .schema import from_legacy

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


# --- results and webhooks --------------------------------------------------------------------------------------


def save_images(reply: Reply, folder: Path, stem: str) -> list[Path]:
    """Write the reply's images as `<stem>[-i].<ext>` into `folder`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    extension = str(reply.body.get("$meta", {}).get("image_format", "PNG")).lower().replace("jpeg", "jpg")
    images = reply.images
    paths = []
    for index, data in enumerate(images):
        suffix = f"-{index}" if len(images) > 1 else ""
        path = folder / f"{stem}{suffix}.{extension}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def verify_webhook(key: str, body: bytes, headers: Mapping[str, str], tolerance_s: float = 300) -> bool:
    """For webhook receivers: True when `body` was signed by a server holding SIGN_KEY `key`, less than
    `tolerance_s` ago. Check the raw body bytes, before parsing them."""
    return verify_signature(key, body, headers, tolerance_s)


# --- the command -----------------------------------------------------------------------------------------------


def run_tests(
    names: list[str],
    *,
    url: str | None = None,
    runpod: bool = False,
    endpoint: str | None = None,
    jobs: bool = False,
    call_args: list[str] | None = None,
    model_args: list[str] | None = None,
    output_dir: str | Path = "output",
    timeout_s: float = 600,
    api_key: str | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """`diffusers-api client`: send each named test, print its request time and `$timings`, save its images.
    Raises ClientError (with a message for the user) at the first test that fails."""
    unknown = [name for name in names if name not in TESTS]
    if unknown:
        raise ClientError(f"no test named {', '.join(unknown)}; known: {', '.join(TESTS)}")
    model, call = parse_pairs(model_args), parse_pairs(call_args)
    if jobs and runpod:
        raise ClientError("--jobs and --runpod exclude each other: RunPod has jobs of its own")
    if endpoint and not runpod:
        raise ClientError("--endpoint names a RunPod endpoint: it goes with --runpod")
    settings = ClientSettings()
    if runpod:
        sender: Client | JobsClient | RunPodClient = _runpod_sender(settings, url, endpoint, timeout_s, api_key)
    else:
        sender = _sender(settings, url, jobs, timeout_s, api_key)
    for name in names:
        if isinstance(sender, JobsClient):
            sender.on_progress = _progress_printer(name, out)
        out(f"{name}: sending to {sender.target}")
        reply = sender.send(build_test(name, model, call))
        for event in reply.events:
            out(f"{name}: event {json.dumps(event)}")
        out(f"{name}: request took {reply.seconds:.2f} s; $timings {json.dumps(reply.timings)}")
        for path in save_images(reply, Path(output_dir), name):
            out(f"{name}: saved {path}")
    return 0


def _progress_printer(name: str, out: Callable[[str], None]) -> Callable[[dict[str, Any]], None]:
    def report(status: dict[str, Any]) -> None:
        progress = status.get("progress", {})
        line = f"{name}: job {status['id']} {status['status']} ({progress.get('stage')})"
        if progress.get("steps"):
            line += f" step {progress['step']}/{progress['steps']}"
        if progress.get("eta_s") is not None:
            line += f", about {progress['eta_s']:g} s left"
        out(line)

    return report


def _sender(
    settings: ClientSettings, url: str | None, jobs: bool, timeout_s: float, api_key: str | None
) -> Client | JobsClient:
    if jobs:
        return JobsClient(url or settings.test_url, api_key=api_key, timeout_s=timeout_s)
    return Client(url or settings.test_url, api_key=api_key, timeout_s=timeout_s)


def _runpod_sender(
    settings: ClientSettings, url: str | None, endpoint: str | None, timeout_s: float, api_key: str | None
) -> RunPodClient:
    """`endpoint` (else RUNPOD_ENDPOINT_ID) is an id under `url` (else RUNPOD_BASE_URL), or a URL of its own."""
    key = api_key or (settings.runpod_api_key.get_secret_value() if settings.runpod_api_key else None)
    endpoint = endpoint or settings.runpod_endpoint_id
    if not endpoint:  # RunPod's bare API URL is no endpoint: a job posted there goes nowhere
        raise ClientError(
            "--runpod needs an endpoint: --endpoint ID (or RUNPOD_ENDPOINT_ID), or --endpoint URL for a local "
            "one (diffusers-api runpod --rp_serve_api)"
        )
    if endpoint.startswith(("http://", "https://")):
        return RunPodClient(endpoint, None, key, timeout_s=timeout_s)
    return RunPodClient(url or settings.runpod_base_url, endpoint, key, timeout_s=timeout_s)
