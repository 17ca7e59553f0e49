"""Requests that must step together, however busy the machine is."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from diffusers_api.denoising import SharedSteps

if TYPE_CHECKING:
    from diffusers_api.runner import Runner
    from diffusers_api.schema import GenerateRequest, GenerateResult

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


def run_together(runner: Runner, steps: SharedSteps, requests: list[GenerateRequest]) -> list[GenerateResult]:
    """Run `requests` through `runner` (built with `steps`) at once, in one batch (`in_one_batch`), each on its own
    thread as the engine runs them; then stop the loop. Their results, in order."""
    try:
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            futures = in_one_batch(steps, len(requests), lambda: [pool.submit(runner.run, r) for r in requests])
            return [future.result() for future in futures]
    finally:
        steps.stop()
