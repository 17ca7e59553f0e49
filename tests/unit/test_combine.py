"""The Combiner: calls that arrive while one runs are batched into the next run; a lone call never waits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffusers_api.engine.combine import Combiner


class Recorder:
    """A batched function that records its batches; the first run can be held until released."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(10)
        if any(item < 0 for item in items):
            raise ValueError(f"negative item in {items}")
        return [item * 10 for item in items]


def wait_for_queue(combiner: Combiner[int, int], size: int) -> None:
    deadline = time.monotonic() + 10
    while len(combiner._queue) < size:
        assert time.monotonic() < deadline, "calls never queued"
        time.sleep(0.001)


def test_a_lone_call_runs_at_once_by_itself() -> None:
    recorder = Recorder()
    combiner: Combiner[int, int] = Combiner(run=recorder)
    assert combiner("k", 3) == 30
    assert recorder.batches == [[3]]
    assert combiner.stats.summary() == {"calls": 1, "runs": 1, "mean_calls_per_run": 1.0, "largest": 1, "retried": 0}


def test_calls_arriving_during_a_run_go_together_in_the_next() -> None:
    recorder = Recorder(hold_first=True)
    combiner: Combiner[int, int] = Combiner(run=recorder, max_weight=8)
    with ThreadPoolExecutor(max_workers=5) as pool:
        first = pool.submit(combiner, "k", 1)
        assert recorder.started.wait(10)
        rest = [pool.submit(combiner, "k", item) for item in (2, 3, 4, 5)]
        wait_for_queue(combiner, 4)
        recorder.release.set()
        assert first.result(10) == 10
        assert [future.result(10) for future in rest] == [20, 30, 40, 50]  # each caller gets its own result
    assert recorder.batches == [[1], [2, 3, 4, 5]]  # in order of arrival
    assert combiner.stats.runs == 2


def test_a_run_takes_at_most_max_weight_and_a_heavier_call_runs_alone() -> None:
    recorder = Recorder(hold_first=True)
    combiner: Combiner[int, int] = Combiner(run=recorder, max_weight=4)
    with ThreadPoolExecutor(max_workers=6) as pool:
        first = pool.submit(combiner, "k", 0)
        assert recorder.started.wait(10)
        futures = []
        for item, weight in ((1, 2), (2, 2), (3, 2), (4, 9), (5, 1)):
            futures.append(pool.submit(combiner, "k", item, weight))
            wait_for_queue(combiner, len(futures))  # one at a time: the queue's order is the arrival order
        recorder.release.set()
        assert [future.result(10) for future in [first, *futures]] == [0, 10, 20, 30, 40, 50]
    assert recorder.batches[0] == [0]
    assert recorder.batches[1] == [1, 2]  # 2 + 2 fills the weight of 4
    assert sorted(map(sorted, recorder.batches[2:])) == [[3], [4], [5]]  # a run stops at the first that overflows


def test_different_keys_never_share_a_run() -> None:
    recorder = Recorder(hold_first=True)
    combiner: Combiner[int, int] = Combiner(run=recorder)
    with ThreadPoolExecutor(max_workers=5) as pool:
        first = pool.submit(combiner, "a", 1)
        assert recorder.started.wait(10)
        others = [pool.submit(combiner, key, item) for key, item in (("a", 2), ("b", 3), ("a", 4))]
        time.sleep(0.2)
        recorder.release.set()
        assert [future.result(10) for future in [first, *others]] == [10, 20, 30, 40]
    assert sorted(map(sorted, recorder.batches)) == [[1], [2, 4], [3]]


def test_a_failing_run_is_retried_call_by_call_so_a_bad_item_fails_alone() -> None:
    recorder = Recorder(hold_first=True)
    combiner: Combiner[int, int] = Combiner(run=recorder)
    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(combiner, "k", 1)
        assert recorder.started.wait(10)
        rest = [pool.submit(combiner, "k", item) for item in (2, -1, 3)]
        wait_for_queue(combiner, 3)
        recorder.release.set()
        assert first.result(10) == 10
        assert rest[0].result(10) == 20
        with pytest.raises(ValueError, match="negative item in \\[-1\\]"):
            rest[1].result(10)
        assert rest[2].result(10) == 30
    assert recorder.batches == [[1], [2, -1, 3], [2], [-1], [3]]
    assert combiner.stats.retried == 1


def test_a_run_that_returns_the_wrong_number_of_results_fails_loudly() -> None:
    combiner: Combiner[int, int] = Combiner(run=lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        combiner("k", 1)
