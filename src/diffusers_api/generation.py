"""The path every transport takes: one request (`Generation`) run on the engine, with its events.

HTTP (`POST /`, `/v1/generate`), jobs (`/v1/jobs`) and the RunPod worker all build a `Generation` and await
`generate`; the model is loaded through `boot` at start. So webhooks, progress, cancellation and the batching
engine behave the same whichever way a request came in:

    transport -> Generation(request, events) -> generate() -> engine.submit() -> runner.run() -> images

Training (`train`) takes the same way with its own request: `engine.run_alone` runs it with nothing else on the
device, then its result is packed and uploaded off the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import Cancelled, from_exception
from .events import RequestEvents

if TYPE_CHECKING:
    from .config import Settings
    from .engine import Engine
    from .runner import Runner
    from .schema import AnyRequest, GenerateResult
    from .schema.train import TrainRequest, TrainResult


@dataclass(eq=False)
class Generation:
    """One request on its way through the engine: what to make, where its events go, how to stop it."""

    request: AnyRequest  # a generation, or an upscale
    # progress comes back through `events.progress`, on the engine's thread; by default nobody listens
    events: RequestEvents = field(default_factory=lambda: RequestEvents(sinks=[], container_id=""))
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop at the next step
    # called on the engine's thread when the request leaves the queue and starts running
    on_start: Callable[[], None] | None = None


async def boot(engine: Engine, events: RequestEvents) -> None:
    """Load the model, reporting `init` start/done (or error) to SEND_URL."""
    events.emit("init", "start")
    started = time.perf_counter()
    await engine.start()
    elapsed = round((time.perf_counter() - started) * 1000, 2)
    if engine.setup_error:
        events.emit("init", "error", error=engine.setup_error, timings={"init": elapsed})
    else:
        events.emit("init", "done", timings={"init": elapsed})


async def generate(engine: Engine, generation: Generation) -> GenerateResult:
    """Run one request on the engine, reporting `inference` start, throttled progress, and done or error.
    Cancelling the awaiting task cancels the request: it stops at the next denoising step."""
    events = generation.events
    events.emit("inference", "start")
    try:
        result = await engine.submit(generation)
    except asyncio.CancelledError:  # the client left, or the job was cancelled: the request stops too
        generation.cancel.set()
        events.emit("inference", "error", error=Cancelled("request cancelled").to_wire())
        raise
    except Exception as exc:
        events.emit("inference", "error", error=from_exception(exc).to_wire())
        raise
    events.emit("inference", "done", timings=result.timings, seeds=result.seeds)
    return result


async def train(
    engine: Engine,
    request: TrainRequest,
    events: RequestEvents,
    settings: Settings,
    cancel: threading.Event | None = None,
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train on the engine with nothing else on the device, then upload and/or keep the result; reports
    `training` start, progress (per optimizer step) and done or error, then `compress` and `upload`. Cancelling
    the awaiting task (or setting `cancel`) stops the training within a step. $timings: loadModel, training,
    compress, upload."""
    from . import training

    cancel = cancel or threading.Event()
    events.stage = "training"
    job_id = request.request_id or uuid.uuid4().hex
    timings: dict[str, float] = {}
    training.destination(request, settings)  # a bad dest_url or a taken name costs no training
    training.check_name_free(request, settings)
    events.emit("training", "start")
    staging = contextlib.ExitStack()  # entered and left on a thread: removing a model directory takes a while
    try:
        workdir = await asyncio.to_thread(staging.enter_context, training.workdir(settings, job_id))

        def work(runner: Runner) -> training.Trained:
            if cancel.is_set():
                raise Cancelled("training cancelled before it started")
            if on_start is not None:
                on_start()
            return training.train(runner.store, request, workdir, events.progress, cancel, timings)

        trained = await engine.run_alone(work, cancel)
        events.emit("training", "done", timings=dict(timings), steps=trained.steps, loss=trained.loss)
        # Once trained, the result is delivered whole even if the job is cancelled meanwhile: the work directory
        # must outlive the upload that reads it.
        delivery = asyncio.ensure_future(
            asyncio.to_thread(training.deliver, trained, request, settings, events.emit, timings)
        )
        try:
            result = await asyncio.shield(delivery)
        except asyncio.CancelledError:
            await asyncio.wait([delivery])
            raise
    except asyncio.CancelledError:
        cancel.set()
        events.emit("training", "error", error=Cancelled("training cancelled").to_wire())
        raise
    except Exception as exc:
        events.emit("training", "error", error=from_exception(exc).to_wire())
        raise
    finally:
        await asyncio.to_thread(staging.close)
    return result


class InFlight:
    """The generations an HTTP server is answering outside jobs (the job store keeps its own), so that a shutdown
    can wait for them and then stop those still running past its grace period (http/server.py)."""

    def __init__(self) -> None:
        self.generations: set[Generation] = set()

    async def generate(self, engine: Engine, generation: Generation) -> GenerateResult:
        """`generate`, counted while it runs."""
        self.generations.add(generation)
        try:
            return await generate(engine, generation)
        finally:
            self.generations.discard(generation)

    def cancel_all(self) -> int:
        """Stop each at its next step (a queued one never starts): it fails with CANCELLED, which its client gets
        as its answer and its webhook as its last event. Returns how many there were."""
        for generation in self.generations:
            generation.cancel.set()
        return len(self.generations)
