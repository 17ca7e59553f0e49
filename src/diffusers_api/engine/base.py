"""What every engine offers the transports: start, submit, health, stats. The batching engine replaces the serial
one behind this same seam. Engines sit above the runner: they decide when a request runs (admission) and own the
lifecycle; the runner runs it."""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..devices import device_memory, is_fatal_device_error
from ..errors import Cancelled, DiffusersAPIError, NotReady

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from ..denoising import StepStats
    from ..generation import Generation
    from ..runner import Runner
    from ..schema import GenerateResult

log = logging.getLogger(__name__)

T = TypeVar("T")


class Health(enum.StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    BUSY = "BUSY"
    SETUP_FAILED = "SETUP_FAILED"
    DEFUNCT = "DEFUNCT"  # a fatal device error: no request can run until the process is replaced

    @property
    def serving(self) -> bool:
        """The model is loaded and requests are taken (READY, or BUSY with some in flight)."""
        return self in (Health.READY, Health.BUSY)


def probe_device_memory(health: Health) -> dict[str, float] | None:
    """`devices.device_memory()` for a probe (/health, /metrics): None while the model loads, when the engine's
    thread may be half-way through importing torch and a probe must leave it alone."""
    if health is Health.STARTING:
        return None
    return device_memory()


class Engine(Protocol):
    """Runs requests on the device. Implementations must keep the event loop free."""

    @property
    def health(self) -> Health: ...

    @property
    def setup_error(self) -> str | None: ...

    @property
    def queue_depth(self) -> int: ...

    async def start(self) -> None:
        """Load the configured model; never raises (a failure sets SETUP_FAILED)."""

    async def stop(self) -> None: ...

    async def submit(self, generation: Generation) -> GenerateResult:
        """Queue a request and wait for its result. Cancelling the awaiting task cancels the request (its
        `cancel` is set). `generation.on_start` is called, on the engine's thread, when the request leaves the
        queue and starts running."""
        ...

    async def run_alone(self, work: Callable[[Runner], T], cancel: threading.Event) -> T:
        """Run `work(runner)` on the engine's thread with nothing else on the device (a training): requests
        admitted before it finish first, requests that come after wait in the queue until it is done. Cancelling
        the awaiting task sets `cancel` and waits for `work` to return (it stops within a step), so that nothing
        else starts while it still holds the device."""
        ...

    def stats(self) -> StepStats | None:
        """The shared steps' counters (batching, loop, compile); None when requests run alone."""

    def models(self) -> dict[str, Any]:
        """Resident and cached models, and the memory budget (GET /v1/models)."""
        ...

    def schedulers(self) -> dict[str, Any]:
        """The served model's usable schedulers and its default (GET /v1/schedulers). Blocking: call it on a
        thread. NotReady until a model is loaded."""
        ...


class BaseEngine:
    """What the engines share: loading the model on their own threads, health, stats, and stopping."""

    def __init__(self, runner: Runner, executor: ThreadPoolExecutor) -> None:
        self.runner = runner
        self._executor = executor
        self._health = Health.STARTING
        self._setup_error: str | None = None

    @property
    def health(self) -> Health:
        if self._health is Health.READY and self.queue_depth:
            return Health.BUSY
        return self._health

    @property
    def setup_error(self) -> str | None:
        return self._setup_error

    @property
    def queue_depth(self) -> int:
        raise NotImplementedError

    async def start(self) -> None:
        """Load the configured model; a failure sets SETUP_FAILED (and the reason) instead of raising."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.start)
        except Exception as exc:
            message = exc.message if isinstance(exc, DiffusersAPIError) else f"{type(exc).__name__}: {exc}"
            log.exception("model setup failed: %s", message)
            self._setup_error, self._health = message, Health.SETUP_FAILED
            return
        self._health = Health.READY

    async def stop(self) -> None:
        if self.runner.steps is not None:
            self.runner.steps.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> StepStats | None:
        return self.runner.steps.stats() if self.runner.steps is not None else None

    def models(self) -> dict[str, Any]:
        return self.runner.store.describe()

    def schedulers(self) -> dict[str, Any]:
        return self.runner.schedulers()

    async def _run(self, generation: Generation) -> GenerateResult:
        """Run `generation` on one of the engine's threads; leaving (a cancelled await) cancels it."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._execute, generation)
        except asyncio.CancelledError:
            generation.cancel.set()  # the client left: stop at the next step (a queued request never starts)
            raise

    async def _run_exclusive(self, work: Callable[[Runner], T], cancel: threading.Event) -> T:
        """`work(runner)` on one of the engine's threads; the caller has made sure nothing else runs. A cancelled
        await waits for `work` to stop (within a step) before it lets the caller release the device."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, work, self.runner)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            await asyncio.wait([future])
            raise

    def _execute(self, generation: Generation) -> GenerateResult:
        """What an engine's thread runs for one request."""
        if generation.cancel.is_set():
            raise Cancelled("request cancelled before it started")
        if generation.on_start is not None:
            generation.on_start()
        try:
            return self.runner.run(generation.request, generation.events.progress, generation.cancel)
        except DiffusersAPIError as exc:
            if is_fatal_device_error(exc):
                log.error("fatal device error: the engine is DEFUNCT and takes no more requests (%s)", exc.message)
                self._health = Health.DEFUNCT
            raise

    def _check_ready(self) -> None:
        if self._health is not Health.READY:
            raise NotReady(f"the server is {self._health.value.lower()}", state=self._health.value)
