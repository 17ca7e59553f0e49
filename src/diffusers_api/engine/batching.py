"""The batching engine: many requests in flight at once, their UNet steps shared (denoising.SharedSteps).

Admission is first come, first served and bounded by images in flight (MAX_BATCH_SIZE), so the batch never
grows past what the device was sized for and no request starves: a waiting request is admitted as soon as
enough images have finished, before any request that came after it. Admitted requests run on a pool of threads
(one per request) through the same Runner as the serial engine, built with shared steps: SD and SDXL requests
are prepared on their thread, denoised in the shared batched loop and decoded on their thread again; other
pipelines run diffusers' own loop, whose UNet calls meet the loop's at the rendezvous.
"""

from __future__ import annotations

import asyncio
import collections
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


class BatchingEngine(BaseEngine):
    def __init__(self, runner: Runner, max_batch_size: int, max_queue: int):
        """`runner` should share steps (`Runner(..., steps=SharedSteps())`): without, requests still run
        concurrently, each in diffusers' own loop."""
        super().__init__(runner, ThreadPoolExecutor(max_workers=max_batch_size, thread_name_prefix="request"))
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._in_flight = 0  # images admitted and not finished
        self._running = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queue_depth(self) -> int:
        return self._running + len(self._waiting)

    async def submit(self, generation: Generation) -> GenerateResult:
        self._check_ready()
        if len(self._waiting) >= self.max_queue:
            raise Busy(f"{len(self._waiting)} requests are waiting; try again shortly", queue_depth=len(self._waiting))
        # an oversized request runs when the device is free
        images = min(generation.request.image_count, self.max_batch_size)
        await self._admit(images)
        self._running += 1
        try:
            return await self._run(generation)  # a client that leaves stops at the next step and frees its rows
        finally:
            self._running -= 1
            self._release(images)

    async def run_alone(self, work: Callable[[Runner], T], cancel: threading.Event) -> T:
        """Admitted like a request of MAX_BATCH_SIZE images: in its turn, once every request admitted before it
        has finished; requests that come after wait behind it (admission is strictly in order)."""
        self._check_ready()
        if len(self._waiting) >= self.max_queue:
            raise Busy(f"{len(self._waiting)} requests are waiting; try again shortly", queue_depth=len(self._waiting))
        await self._admit(self.max_batch_size)
        self._running += 1
        try:
            return await self._run_exclusive(work, cancel)
        finally:
            self._running -= 1
            self._release(self.max_batch_size)

    async def _admit(self, images: int) -> None:
        if not self._waiting and self._in_flight + images <= self.max_batch_size:
            self._in_flight += images
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket.images = images  # type: ignore[attr-defined]
        self._waiting.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            elif ticket.done() and not ticket.cancelled():
                self._release(images)  # admitted just as the client left
            raise

    def _release(self, images: int) -> None:
        self._in_flight -= images
        # strictly in order: the head of the queue goes first, even if a later, smaller request would fit
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.cancelled():  # its request left in this same turn of the loop and has not removed it yet
                self._waiting.popleft()
                continue
            if self._in_flight + ticket.images > self.max_batch_size:  # type: ignore[attr-defined]
                return
            self._waiting.popleft()
            self._in_flight += ticket.images  # type: ignore[attr-defined]
            ticket.set_result(None)
