"""What the decode groups (decoding.py) and the encode groups (encoding.py) share: the counters of their batched
calls, and how a batched call that failed is given up (its members then call alone, as without groups)."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..devices import is_out_of_memory

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class GroupStats:
    """What the batched calls of one kind did so far (VAE decodes, prompt encodes); members of different groups
    update it from their own threads."""

    unit: str  # what a call is counted in, on the wire: "images" (decodes), "prompts" (encodes)
    batches: int = 0  # calls made for a group
    items: int = 0  # the images (prompts) those calls did
    fallbacks: int = 0  # groups whose batched call failed, and whose members then called alone
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, items: int) -> None:
        with self._lock:
            self.batches += 1
            self.items += items

    def count_fallback(self) -> None:
        with self._lock:
            self.fallbacks += 1

    def summary(self) -> dict[str, float]:
        mean = self.items / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            self.unit: self.items,
            f"mean_{self.unit}": round(mean, 2),
            "fallbacks": self.fallbacks,
        }


def batched(
    stats: GroupStats,
    call: str,
    members: int,
    make: Callable[[], T],
    out_of_memory: Callable[[], None] | None = None,
) -> T | None:
    """`make()`, the batched `call` of a group of `members` requests; None when it failed for any reason, running
    out of memory included: counted, logged, and the members then call alone. `out_of_memory` is called after the
    call ran out of memory (and what it held was freed)."""
    try:
        return make()
    except Exception as exc:
        failure, ran_out = f"{type(exc).__name__}: {exc}", is_out_of_memory(exc)
    # Given up outside the except block: its traceback holds the failed call's tensors until it ends.
    _give_up(stats, call, members, failure, ran_out)
    if ran_out and out_of_memory is not None:
        out_of_memory()
    return None


def _give_up(stats: GroupStats, call: str, members: int, failure: str, out_of_memory: bool) -> None:
    """Count and log a failed batched `call` of `members` requests; after running out of memory, free what the
    failed call may still hold."""
    import torch

    stats.count_fallback()
    log.warning("a batched %s of %d requests failed (%s); each calls alone", call, members, failure)
    if out_of_memory:
        gc.collect()  # what the failed call allocated may still sit in reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
