"""The serial engine: an ordered queue in front of one device worker thread.

Requests are served first come, first served, one at a time, on a single thread that owns the device. The
event loop only awaits futures. A request whose client goes away is dropped if it has not started yet, and
interrupted at the next denoising step if it has.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from ..errors import Busy
from .base import BaseEngine

if TYPE_CHECKING:
    from ..generation import Generation
    from ..runner import Runner
    from ..schema import GenerateResult

T = TypeVar("T")


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

    async def run_alone(self, work: Callable[[Runner], T], cancel: threading.Event) -> T:
        """One thread serves the queue in order: `work` runs alone when its turn comes."""
        self._check_ready()
        self._pending += 1
        try:
            return await self._run_exclusive(work, cancel)
        finally:
            self._pending -= 1
