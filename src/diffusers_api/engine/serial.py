"""The serial engine: an ordered queue in front of one device worker thread.

Requests are served first come, first served, one at a time, on a single thread that owns the device. The
event loop only awaits futures. A request whose client goes away is dropped if it has not started yet, and
interrupted at the next denoising step if it has.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..errors import Busy
from .base import EngineLifecycle

if TYPE_CHECKING:
    from ..runner import ProgressCallback, Runner
    from ..schema import GenerateRequest, GenerateResult


class SerialEngine(EngineLifecycle):
    def __init__(self, runner: Runner, max_queue: int) -> None:
        super().__init__(runner, ThreadPoolExecutor(max_workers=1, thread_name_prefix="device"))
        self.max_queue = max_queue
        self._pending = 0  # queued + running

    @property
    def queue_depth(self) -> int:
        return self._pending

    async def submit(
        self,
        request: GenerateRequest,
        progress: ProgressCallback | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> GenerateResult:
        self._check_ready()
        if self._pending >= self.max_queue:
            raise Busy(f"{self._pending} requests are waiting; try again shortly", queue_depth=self._pending)
        cancel = threading.Event()
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._execute, request, progress, cancel, on_start)
        except asyncio.CancelledError:
            cancel.set()  # the client left: stop at the next step (a queued request never starts)
            raise
        finally:
            self._pending -= 1
