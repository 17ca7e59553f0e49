"""Opportunistic batching of one-shot model calls (VAE decodes, prompt encodes) from concurrent request threads.

Requests that step together finish together, and then each decodes its image: N threads launching N small VAE
calls that the GPU runs one after the other anyway, and that fight over the GIL while they launch. A `Combiner`
runs one call at a time per model; calls that arrive while one runs wait, and the next call takes all of them
(up to a limit) as one batch. A lone request never waits for a timer: it runs at once, as it did alone.

A batch that fails is retried call by call, so that one bad input (or a batch too big for the device's memory)
fails only itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class _Ticket(Generic[Item, Result]):
    key: Hashable
    item: Item
    weight: int
    result: Result | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class CombinerStats:
    calls: int = 0  # calls submitted
    runs: int = 0  # batched calls made for them
    largest: int = 0  # most calls in one run
    retried: int = 0  # runs that failed and were retried call by call

    def summary(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "runs": self.runs,
            "mean_calls_per_run": round(self.calls / self.runs, 2) if self.runs else 0.0,
            "largest": self.largest,
            "retried": self.retried,
        }


@dataclass
class Combiner(Generic[Item, Result]):
    """`__call__(key, item)` returns `run([item, ...])[i]`, batching items of equal keys that arrive together.

    `run` gets the items in arrival order and returns one result per item. `max_weight` bounds one batch (by the
    items' weights, e.g. images); an item heavier than that runs alone.
    """

    run: Callable[[list[Item]], list[Result]]
    max_weight: int = 8
    stats: CombinerStats = field(default_factory=CombinerStats)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Ticket[Item, Result]] = []
        self._busy: set[Hashable] = set()  # keys with a run in progress

    def __call__(self, key: Hashable, item: Item, weight: int = 1) -> Result:
        ticket: _Ticket[Item, Result] = _Ticket(key, item, weight)
        with self._cond:
            self.stats.calls += 1
            self._queue.append(ticket)
        while True:
            with self._cond:
                while not ticket.done and key in self._busy:
                    self._cond.wait()
                if ticket.done:
                    break
                # this thread runs the next batch of its key (its own ticket is in it, or in a later one)
                batch = self._take(key)
                self._busy.add(key)
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy.discard(key)
                    self._cond.notify_all()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]

    def _take(self, key: Hashable) -> list[_Ticket[Item, Result]]:
        batch: list[_Ticket[Item, Result]] = []
        weight = 0
        for ticket in list(self._queue):
            if ticket.key != key:
                continue
            if batch and weight + ticket.weight > self.max_weight:
                break
            batch.append(ticket)
            weight += ticket.weight
            self._queue.remove(ticket)
        self.stats.runs += 1
        self.stats.largest = max(self.stats.largest, len(batch))
        return batch

    def _run(self, batch: list[_Ticket[Item, Result]]) -> None:
        failed = False
        try:
            results = self.run([ticket.item for ticket in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a combined call gave {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:
                failed = True  # retried outside the except block, whose traceback holds the failed call's tensors
        else:
            for ticket, result in zip(batch, results, strict=True):
                ticket.result = result
        if failed:
            self.stats.retried += 1
            for ticket in batch:
                self._run([ticket])
        for ticket in batch:
            ticket.done = True
