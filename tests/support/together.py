"""Requests that must step together, however busy the machine is."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from diffusers_api.denoising import SharedSteps

T = TypeVar("T")


def in_one_batch(steps: SharedSteps, requests: int, submit: Callable[[], T], timeout_s: float = 120) -> T:
    """Call `submit` (which starts `requests` requests bound for our loop) with the loop held at the rendezvous
    until all of them have entered it. Without the hold, on a busy 2-core machine the first request can finish
    its steps before the last is prepared, and a test that they were batched would fail for want of company.
    The loop takes the rendezvous' lock to join a round, so holding it holds the loop before its first step."""
    before = steps.denoiser.stats.jobs
    with steps.rendezvous._cond:
        started = submit()
        deadline = time.monotonic() + timeout_s
        while steps.denoiser.stats.jobs < before + requests and time.monotonic() < deadline:
            time.sleep(0.005)
    return started
