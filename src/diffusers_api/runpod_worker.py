"""The RunPod serverless worker: a thin adapter from RunPod jobs onto the same engine as the HTTP server.

This is the only module that imports `runpod` (the `runpod` extra: `pip install 'diffusers-api[runpod]'`).
`diffusers-api runpod` builds the engine, loads the model before taking the first job, then hands `handle` to
`runpod.serverless.start`, which parses its own command-line flags (`--rp_serve_api`, `--rp_api_port`,
`--test_input`, ...) from `sys.argv`; `unknown_sdk_flags` lets the CLI refuse the flags it would ignore.

A job's `input` is the legacy envelope (`{"modelInputs", "callInputs"}`, answered like `POST /`) or a native
request (answered like `/v1/generate`); a training is the envelope with `callInputs.train` or a native training
request (one with `"train": "dreambooth"`, answered with its `TrainResult`). Errors come back as a string
`error` (so RunPod marks the job FAILED) with the machine-readable code and details beside it; `refresh_worker`
is asked for only when the device is left unusable. Several jobs run on one worker at once
(`concurrency_modifier`): they wait in the engine's queue, where a batching engine can merge them.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .devices import is_fatal_device_error
from .engine import Health
from .errors import DiffusersAPIError, InvalidInputs, NotReady, from_exception
from .events import Event, EventHub
from .generation import Generation, boot, generate, train
from .schema import (
    AnyRequest,
    GenerateResponse,
    decode_envelope,
    from_legacy_envelope,
    is_training,
    parse_request,
    to_legacy,
    to_legacy_training,
    train_from_legacy,
)
from .schema.train import TrainRequest, parse_train_request

if TYPE_CHECKING:
    from .config import Settings
    from .engine import Engine

log = logging.getLogger(__name__)

RunPodJob = dict[str, Any]  # a job as RunPod hands it over: {"id", "input", ...}
ProgressUpdate = Callable[[RunPodJob, Any], None]


def runpod_error(error: BaseException, debug: bool = False, defunct: bool = False) -> dict[str, Any]:
    """The one place an error becomes RunPod's `{"error": "<string>"}`, with the code and details beside it
    (and, with DEBUG, the stack). `refresh_worker` asks RunPod for a new worker after a fatal device error (the
    engine is then DEFUNCT)."""
    wrapped = from_exception(error)
    body: dict[str, Any] = {"error": f"{wrapped.code}: {wrapped.message}", "$error": wrapped.to_wire(debug)}
    if defunct or is_fatal_device_error(error):
        body["refresh_worker"] = True
    return body


@dataclass
class ParsedInput:
    request: AnyRequest | TrainRequest  # an upscale from the legacy `use_extra: "upsample"`, or a training
    legacy: bool


def parse_job_input(data: Any) -> ParsedInput:
    """`job["input"]`: the legacy envelope (also as a JSON string) or a native request."""
    if data is None:
        raise InvalidInputs("the job has no 'input'")
    envelope = decode_envelope(data) if isinstance(data, str | bytes) else data
    if not isinstance(envelope, dict):
        raise InvalidInputs(f"job input must be a JSON object, got {type(envelope).__name__}")
    if "modelInputs" in envelope or "callInputs" in envelope:
        if is_training(envelope):
            return ParsedInput(train_from_legacy(envelope), legacy=True)
        return ParsedInput(from_legacy_envelope(envelope), legacy=True)
    if "train" in envelope:
        return ParsedInput(parse_train_request(envelope), legacy=False)
    return ParsedInput(parse_request(envelope), legacy=False)


class ProgressReporter:
    """An event sink that forwards progress events to RunPod's `progress_update` as `{"stage", "step",
    "steps"}`. The events arrive throttled already (callback_steps or PROGRESS_INTERVAL_S); RunPod's helper
    posts from a thread of its own, so calling it from the device thread does not block the denoising loop."""

    def __init__(self, job: RunPodJob, update: ProgressUpdate) -> None:
        self.job = job
        self.update = update

    def __call__(self, event: Event) -> None:
        if event["status"] == "progress":
            self.update(self.job, event["payload"])


def make_handler(
    engine: Engine, hub: EventHub, progress_update: ProgressUpdate
) -> Callable[[RunPodJob], Awaitable[dict[str, Any]]]:
    """The async job handler RunPod calls, once per job, concurrently up to the worker's concurrency."""

    async def handle(job: RunPodJob) -> dict[str, Any]:
        try:
            parsed = parse_job_input(job.get("input"))
            _check_ready(engine)
            events = await hub.for_request(parsed.request, extra_sinks=[ProgressReporter(job, progress_update)])
            if isinstance(parsed.request, TrainRequest):
                trained = await train(engine, parsed.request, events, hub.settings)
                return to_legacy_training(trained) if parsed.legacy else trained.model_dump()
            result = await generate(engine, Generation(parsed.request, events))
        except Exception as exc:
            if not isinstance(exc, DiffusersAPIError):
                log.exception("job %s failed", job.get("id"))
            return runpod_error(exc, hub.settings.debug, defunct=engine.health is Health.DEFUNCT)
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


# LOG_LEVEL -> the SDK's own level names (RunPodLogger: DEBUG, INFO, WARN, ERROR)
_SDK_LOG_LEVELS = {"debug": "DEBUG", "info": "INFO", "warning": "WARN", "error": "ERROR", "critical": "ERROR"}


def import_sdk(log_level: str) -> ModuleType:
    """The runpod SDK, its log at our `log_level` unless RUNPOD_LOG_LEVEL (or the older RUNPOD_DEBUG_LEVEL)
    chooses: at DEBUG, the SDK's default, it logs every job's output (images included) three times. It reads
    the variable once, when it is first imported. ModuleNotFoundError when the runpod extra is not installed."""
    if "RUNPOD_LOG_LEVEL" not in os.environ and "RUNPOD_DEBUG_LEVEL" not in os.environ:
        os.environ["RUNPOD_LOG_LEVEL"] = _SDK_LOG_LEVELS.get(log_level.lower(), "INFO")
    import runpod.serverless

    return runpod


def unknown_sdk_flags(args: Sequence[str], log_level: str) -> list[str]:
    """Those of `args` (what our own parser left) that the SDK does not know either: it would ignore them."""
    parser = getattr(import_sdk(log_level).serverless, "parser", None)
    if parser is None:  # an SDK that no longer parses flags this way: it has the last word
        return []
    unknown: list[str] = parser.parse_known_args(list(args))[1]
    return unknown


def run(settings: Settings) -> None:
    """Load the model, then serve RunPod jobs (or the SDK's local test modes) until the process ends."""
    runpod = import_sdk(settings.log_level)
    from .engine import make_engine

    engine = make_engine(settings)
    hub = EventHub(settings)
    atexit.register(hub.sender.flush, settings.webhook_timeout_s)
    asyncio.run(boot(engine, hub.for_boot()))
    if engine.setup_error:
        log.error("model setup failed: %s; jobs will fail with NOT_READY", engine.setup_error)
    runpod.serverless.start(
        {
            "handler": make_handler(engine, hub, runpod.serverless.progress_update),
            "concurrency_modifier": concurrency(settings),
        }
    )
