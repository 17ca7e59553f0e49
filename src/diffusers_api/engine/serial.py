"""The serial engine: an ordered queue in front of one device worker thread.

Requests are served first come, first served, one at a time, on a single thread that owns the device. The
event loop only awaits futures. A request whose client goes away is dropped if it has not started yet, and
interrupted at the next denoising step if it has.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..errors import Busy, DiffusersAPIError, NotReady
from .base import Health

if TYPE_CHECKING:
    from ..runner import ProgressCallback, Runner
    from ..schema import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)


class SerialEngine:
    def __init__(self, runner: Runner, max_queue: int) -> None:
        self.runner = runner
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._health = Health.STARTING
        self._setup_error: str | None = None
        self._pending = 0  # queued + running

    @property
    def health(self) -> Health:
        if self._health is Health.READY and self._pending:
            return Health.BUSY
        return self._health

    @property
    def setup_error(self) -> str | None:
        return self._setup_error

    @property
    def queue_depth(self) -> int:
        return self._pending

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.runner.start)
        except Exception as exc:
            message = exc.message if isinstance(exc, DiffusersAPIError) else f"{type(exc).__name__}: {exc}"
            log.exception("model setup failed: %s", message)
            self._setup_error = message
            self._health = Health.SETUP_FAILED
            return
        self._health = Health.READY

    async def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: GenerateRequest, progress: ProgressCallback | None = None) -> GenerateResult:
        if self._health is not Health.READY:
            raise NotReady(f"the server is {self._health.value.lower()}", state=self._health.value)
        if self._pending >= self.max_queue:
            raise Busy(f"{self._pending} requests are waiting; try again shortly", queue_depth=self._pending)
        cancel = threading.Event()
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self.runner.run, request, progress, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the client left: stop at the next step (a queued request never starts)
            raise
        finally:
            self._pending -= 1
