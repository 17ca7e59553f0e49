"""The serial engine: an ordered queue in front of one device worker thread.

Requests are served first come, first served, one at a time, on a single thread that owns the device. The
event loop only awaits futures. A request whose client goes away is dropped if it has not started yet, and
interrupted at the next denoising step if it has.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..errors import Busy
from .base import BaseEngine

if TYPE_CHECKING:
    from ..generation import Generation
    from ..runner import Runner
    from ..schema import GenerateResult


class SerialEngine(BaseEngine):
    def __init__(self, runner: Runner, max_queue: int) -> None:
        super().__init__(runner, ThreadPoolExecutor(max_workers=1, thread_name_prefix="device"))
        self.max_queue = max_queue
        self._pending = 0  # queued + running

    @property
    def queue_depth(self) -> int:
        return self._pending

    async def submit(self, generation: Generation) -> GenerateResult:
        self._check_ready()
        if self._pending >= self.max_queue:
            raise Busy(f"{self._pending} requests are waiting; try again shortly", queue_depth=self._pending)
        self._pending += 1
        try:
            return await self._run(generation)
        finally:
            self._pending -= 1
