"""The RunPod serverless worker: a thin adapter from RunPod jobs onto the same engine as the HTTP server.

This is the only module that imports `runpod`. `diffusers-api runpod` builds the engine, loads the model
before taking the first job, then hands `handle` to `runpod.serverless.start`, which parses its own
command-line flags (`--rp_serve_api`, `--rp_api_port`, `--test_input`, ...) from `sys.argv`.

A job's `input` is the legacy envelope (`{"modelInputs", "callInputs"}`, answered like `POST /`) or a native
request (answered like `/v1/generate`). Errors come back as a string `error` (so RunPod marks the job FAILED)
with the machine-readable code and details beside it; `refresh_worker` is asked for only when the device is
left unusable. Several jobs run on one worker at once (`concurrency_modifier`): they wait in the engine's
queue, where a batching engine can merge them.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DiffusersAPIError, InvalidInputs, NotReady, from_exception
from .events import Event, EventHub, generate, start_engine
from .schema import GenerateRequest, GenerateResponse, decode_envelope, from_legacy, parse_request, to_legacy

if TYPE_CHECKING:
    from .config import Settings
    from .engine import Engine

log = logging.getLogger(__name__)

Job = dict[str, Any]
ProgressUpdate = Callable[[Job, Any], None]

# Messages of errors after which the CUDA context is poisoned and every later job would fail: RunPod should
# replace the worker. (Out-of-memory is not among them: PyTorch frees the memory and the next job runs.)
_FATAL_DEVICE_ERRORS = re.compile(
    r"CUDA error|CUBLAS_STATUS_|CUDNN_STATUS_|device-side assert|illegal memory access|NCCL error", re.IGNORECASE
)


def runpod_error(error: BaseException, debug: bool = False) -> dict[str, Any]:
    """The one place an error becomes RunPod's `{"error": "<string>"}`, with the code and details beside it
    (and, with DEBUG, the stack)."""
    wrapped = from_exception(error)
    body: dict[str, Any] = {"error": f"{wrapped.code}: {wrapped.message}", "$error": wrapped.to_wire(debug)}
    if is_fatal_device_error(error):
        body["refresh_worker"] = True
    return body


def is_fatal_device_error(error: BaseException) -> bool:
    """True when `error`, or an error it was raised from, left the GPU unusable."""
    seen: BaseException | None = error
    while seen is not None:
        if _FATAL_DEVICE_ERRORS.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass
class ParsedJob:
    request: GenerateRequest
    legacy: bool


def parse_job_input(data: Any) -> ParsedJob:
    """`job["input"]`: the legacy envelope (also as a JSON string) or a native request."""
    if data is None:
        raise InvalidInputs("the job has no 'input'")
    envelope = decode_envelope(data) if isinstance(data, str | bytes) else data
    if not isinstance(envelope, dict):
        raise InvalidInputs(f"job input must be a JSON object, got {type(envelope).__name__}")
    if "modelInputs" in envelope or "callInputs" in envelope:
        return ParsedJob(from_legacy(envelope), legacy=True)
    return ParsedJob(parse_request(envelope), legacy=False)


class ProgressReporter:
    """An event sink that forwards progress events to RunPod's `progress_update` as `{"stage", "step",
    "steps"}`. The events arrive throttled already (callback_steps or PROGRESS_INTERVAL_S); RunPod's helper
    posts from a thread of its own, so calling it from the device thread does not block the denoising loop."""

    def __init__(self, job: Job, update: ProgressUpdate) -> None:
        self.job = job
        self.update = update

    def __call__(self, event: Event) -> None:
        if event["status"] == "progress":
            self.update(self.job, event["payload"])


def make_handler(
    engine: Engine, hub: EventHub, progress_update: ProgressUpdate
) -> Callable[[Job], Awaitable[dict[str, Any]]]:
    """The async job handler RunPod calls, once per job, concurrently up to the worker's concurrency."""

    async def handle(job: Job) -> dict[str, Any]:
        try:
            parsed = parse_job_input(job.get("input"))
            _check_ready(engine)
            events = await hub.for_request(parsed.request, extra_sinks=[ProgressReporter(job, progress_update)])
            result = await generate(engine, parsed.request, events)
        except Exception as exc:
            if not isinstance(exc, DiffusersAPIError):
                log.exception("job %s failed", job.get("id"))
            return runpod_error(exc, hub.settings.debug)
        return to_legacy(result) if parsed.legacy else GenerateResponse.from_result(result).model_dump()

    return handle


def _check_ready(engine: Engine) -> None:
    if engine.setup_error:
        raise NotReady(f"the model failed to load: {engine.setup_error}", state=engine.health.value)


def concurrency(settings: Settings) -> Callable[[int], int]:
    """RunPod's `concurrency_modifier`: how many jobs this worker takes at once."""

    jobs = settings.runpod_concurrency or settings.max_batch_size  # the batching engine merges them

    def modifier(current: int) -> int:
        return jobs

    return modifier


def run(settings: Settings) -> None:
    """Load the model, then serve RunPod jobs (or the SDK's local test modes) until the process ends."""
    import runpod

    from .engine import make_engine

    engine = make_engine(settings)
    hub = EventHub(settings)
    atexit.register(hub.sender.flush, settings.webhook_timeout_s)
    asyncio.run(start_engine(engine, hub.for_boot()))
    if engine.setup_error:
        log.error("model setup failed: %s; jobs will fail with NOT_READY", engine.setup_error)
    runpod.serverless.start(
        {
            "handler": make_handler(engine, hub, runpod.serverless.progress_update),
            "concurrency_modifier": concurrency(settings),
        }
    )
