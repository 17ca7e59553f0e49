"""What every engine offers the transports: start, submit, health. The batching engine replaces the serial one
behind this same seam."""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..errors import DiffusersAPIError, NotReady

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from ..runner import ProgressCallback, Runner
    from ..schema import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)


class Health(enum.StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    BUSY = "BUSY"
    SETUP_FAILED = "SETUP_FAILED"
    DEFUNCT = "DEFUNCT"

    @property
    def serving(self) -> bool:
        """The model is loaded and requests are taken (READY, or BUSY with some in flight)."""
        return self in (Health.READY, Health.BUSY)


def probe_device_memory(health: Health) -> dict[str, float] | None:
    """`runner.device_memory()` for a probe (/health, /metrics): None while the model loads, when the engine's
    thread may be half-way through importing torch and a probe must leave it alone."""
    if health is Health.STARTING:
        return None
    from ..runner import device_memory

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

    async def submit(
        self,
        request: GenerateRequest,
        progress: ProgressCallback | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> GenerateResult:
        """Queue a request and wait for its result. Cancelling the awaiting task cancels the request.
        `on_start` is called, on the engine's thread, when the request leaves the queue and starts running."""
        ...


class EngineLifecycle:
    """What the engines share: loading the model on their own threads, health, and stopping."""

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
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _execute(
        self,
        request: GenerateRequest,
        progress: ProgressCallback | None,
        cancel: threading.Event,
        on_start: Callable[[], None] | None,
    ) -> GenerateResult:
        """What an engine's thread runs for one request."""
        if on_start is not None:
            on_start()
        return self.runner.run(request, progress, cancel)

    def _check_ready(self) -> None:
        if self._health is not Health.READY:
            raise NotReady(f"the server is {self._health.value.lower()}", state=self._health.value)
