"""Requests that arrive while a prompt encode of theirs runs encode together in one text-encoder call, on the tiny
models: each request gets the images it gets encoding alone, and the calls really are fewer (the forwards of the
model's first text encoder are counted, with the rows of each).

Arrival is made deterministic rather than left to timing: the first request's encode is held inside its text
encoder's first forward until the others have queued behind it (and those of other keys have started encoding
alone). The first request then encodes alone, with the call made without groups (its images are bit-identical to
before), and the queued ones in the next call. Every run's tasks step together in one loop and decode alone, so
images differ only by their encodes; a batched call's are held to support/tiny.py's bound. (ENCODE_BATCH_MAX's way
to the shared steps, and /health's counters, are tested with DECODE_BATCH_MAX's in test_batched_decode.py.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffusers_api.denoising import Denoiser, Rendezvous
from diffusers_api.denoising import tasks as denoise
from diffusers_api.denoising.encoding import EncodeGroups
from diffusers_api.errors import Cancelled
from diffusers_api.models.store import LoadedModel
from diffusers_api.schema import GenerateRequest
from support.tiny import MODELS, assert_as_alone, assert_close, call, model, new_pipe, shared_runner
from support.together import run_together

HOLD_S = 30  # the longest the first encode is held for its company (a test whose company never comes fails)

Calls = Callable[[], list[dict[str, Any]]]  # a run's requests, made anew for each run (generators are consumed)


class TextEncoder:
    """The forwards of a model's first text encoder (the rows of each, in order). With `until`, the first forward
    is held until `until()` is true; with `fail`, the first forward of several rows raises it."""

    def __init__(
        self, module: Any, until: Callable[[], bool] | None = None, fail: type[Exception] | None = None
    ) -> None:
        self.rows: list[int] = []
        self.threads: set[int] = set()  # the threads that called it
        self.held = threading.Event()
        self._until, self._fail = until, fail
        self._handle = module.register_forward_pre_hook(self._forward)

    def _forward(self, module: Any, args: tuple[Any, ...]) -> None:
        rows = int(args[0].shape[0])
        self.rows.append(rows)
        self.threads.add(threading.get_ident())
        if len(self.rows) == 1 and self._until is not None:
            self.held.set()
            deadline = time.monotonic() + HOLD_S
            while not self._until() and time.monotonic() < deadline:
                time.sleep(0.005)
        if self._fail is not None and rows > 1:
            fail, self._fail = self._fail, None
            raise fail("the batched encode failed (as the test asks)")

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture
def text_encoder() -> Iterator[Callable[..., TextEncoder]]:
    """`watch(loaded, until=..., fail=...)`: a `TextEncoder` on the model's first text encoder, for this test."""
    made: list[TextEncoder] = []

    def watch(loaded: LoadedModel, **options: Any) -> TextEncoder:
        made.append(TextEncoder(loaded.pipelines.components["text_encoder"], **options))
        return made[-1]

    yield watch
    for watcher in made:
        watcher.remove()


def arrive_together(
    pipes: list[Any],
    calls: list[dict[str, Any]],
    encodes: EncodeGroups,
    held: threading.Event,
    cancels: dict[int, threading.Event] | None = None,
) -> list[Any]:
    """Prepare the requests on threads of their own: the first, then (once its encode is held) the others. Their
    futures, in order."""
    cancels = cancels or {}
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        first = pool.submit(denoise.prepare, pipes[0], calls[0], encodes)
        assert held.wait(60), "the first request never reached its text encoder"
        others = [
            pool.submit(denoise.prepare, pipes[i], calls[i], encodes, cancels.get(i)) for i in range(1, len(calls))
        ]
        return [first, *others]


def images(pipes: list[Any], calls: list[dict[str, Any]], tasks: list[Any]) -> list[list[np.ndarray]]:
    """Each request's images: its task stepped with the others in one loop, then decoded alone."""
    denoiser = Denoiser(Rendezvous(max_wait_s=5.0), decode_batch_max=1)
    denoiser.submit(*tasks)
    for task in tasks:
        assert task.done.wait(60)
    denoiser.stop()
    assert all(task.error is None for task in tasks)
    outputs = [denoise.finish(pipe, task, kwargs) for pipe, task, kwargs in zip(pipes, tasks, calls, strict=True)]
    return [[np.asarray(image).astype(int) for image in output.images] for output in outputs]


def alone(loaded: LoadedModel, calls: Calls) -> list[list[np.ndarray]]:
    """The reference: each request prepared alone, one after the other, as without encode groups."""
    pipes, kwargs = [new_pipe(loaded) for _ in calls()], calls()
    return images(pipes, kwargs, [denoise.prepare(pipe, each) for pipe, each in zip(pipes, kwargs, strict=True)])


def together(loaded: LoadedModel, calls: Calls, encodes: EncodeGroups, watcher: TextEncoder) -> list[Any]:
    """The requests arriving together (`arrive_together`); their images."""
    kwargs = calls()
    pipes = [new_pipe(loaded) for _ in kwargs]
    tasks = [future.result() for future in arrive_together(pipes, kwargs, encodes, watcher.held)]
    return images(pipes, kwargs, tasks)


def assert_images(got: list[list[np.ndarray]], expected: list[list[np.ndarray]], exact: set[int]) -> None:
    """Requests in `exact` encoded alone: bit-identical; the others within the bound."""
    for index, (images_got, images_expected) in enumerate(zip(got, expected, strict=True)):
        assert len(images_got) == len(images_expected)
        for image, reference in zip(images_got, images_expected, strict=True):
            if index in exact:
                assert np.array_equal(image, reference), index
            else:
                assert_close(image, reference)


@pytest.mark.parametrize("model_id", list(MODELS), ids=lambda name: name.removeprefix("builtin/"))
def test_requests_arriving_together_encode_in_one_call(
    models_dir: Path, model_id: str, text_encoder: Callable[..., TextEncoder]
) -> None:
    loaded, size = model(models_dir, model_id), MODELS[model_id]

    def calls() -> list[dict[str, Any]]:  # one of the company with two images per prompt
        return [call(1, **size), call(2, images=2, **size), call(3, **size), call(4, **size)]

    counted = text_encoder(loaded)
    expected = alone(loaded, calls)
    forwards = len(counted.rows) // 4  # a text encoder's forwards per call (two with guidance: the negative too)
    assert counted.rows == [1] * 4 * forwards
    counted.remove()
    encodes = EncodeGroups(8)
    held = text_encoder(loaded, until=lambda: encodes.queued == 3)
    got = together(loaded, calls, encodes, held)
    assert held.rows == [1] * forwards + [3] * forwards  # the first alone, the three that queued in one call
    assert encodes.stats.summary() == {"batches": 1, "prompts": 3, "mean_prompts": 3.0, "fallbacks": 0}
    assert_images(got, expected, exact={0})


# case -> (model, the requests: the first's key, two more of it, then others of keys of their own)
KEYS = {
    "sd-guidance": ("builtin/tiny-sd", lambda: [call(1), call(2), call(3), call(4, guidance_scale=1.0)]),
    "sdxl-none-or-empty-negative-and-clip-skip": (
        "builtin/tiny-sdxl",
        lambda: [call(1), call(2), call(3), call(4, negative_prompt=""), call(5, clip_skip=1)],
    ),
}


@pytest.mark.parametrize("case", list(KEYS))
def test_requests_of_other_keys_never_share_a_call(
    models_dir: Path, case: str, text_encoder: Callable[..., TextEncoder]
) -> None:
    """The others arrive while the first is held: the two of its key queue, the ones of other keys encode alone
    at once (were their key the first's, they would queue too, and the call would have more rows)."""
    model_id, calls = KEYS[case]
    loaded = model(models_dir, model_id)
    expected = alone(loaded, calls)
    encodes = EncodeGroups(8)
    own_keys = len(calls()) - 3
    held = text_encoder(loaded, until=lambda: encodes.queued == 2 and len(held.threads) == 1 + own_keys)
    got = together(loaded, calls, encodes, held)
    assert max(held.rows) == 2  # the two of the first's key, together
    assert encodes.stats.summary() == {"batches": 1, "prompts": 2, "mean_prompts": 2.0, "fallbacks": 0}
    assert_images(got, expected, exact={0} | set(range(3, 3 + own_keys)))


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError], ids=["out-of-memory", "error"])
def test_a_failing_batched_encode_falls_back_to_each_alone(
    models_dir: Path, text_encoder: Callable[..., TextEncoder], error: type[Exception]
) -> None:
    loaded = model(models_dir, "builtin/tiny-sd")

    def calls() -> list[dict[str, Any]]:
        return [call(1), call(2, images=2), call(3), call(4)]

    expected = alone(loaded, calls)
    encodes = EncodeGroups(8)
    held = text_encoder(loaded, until=lambda: encodes.queued == 3, fail=error)
    got = together(loaded, calls, encodes, held)
    assert held.rows.count(3) == 1  # the failed call
    assert sorted(held.rows) == [1] * 8 + [3]  # then the three alone, as the first: two forwards each (guided)
    assert encodes.stats.summary() == {"batches": 0, "prompts": 0, "mean_prompts": 0, "fallbacks": 1}
    assert_images(got, expected, exact={0, 1, 2, 3})


def test_a_member_cancelled_while_it_queued_is_left_out(
    models_dir: Path, text_encoder: Callable[..., TextEncoder]
) -> None:
    loaded = model(models_dir, "builtin/tiny-sd")
    kwargs = [call(1), call(2), call(3), call(4)]
    pipes = [new_pipe(loaded) for _ in kwargs]
    encodes = EncodeGroups(8)
    held = text_encoder(loaded, until=lambda: encodes.queued == 3)
    cancelled = threading.Event()
    cancelled.set()  # its request went away while its encode waited
    futures = arrive_together(pipes, kwargs, encodes, held.held, cancels={2: cancelled})
    with pytest.raises(Cancelled):
        futures[2].result()
    assert all(futures[i].result().hidden.shape[0] == 2 for i in (0, 1, 3))
    assert held.rows == [1, 1, 2, 2]  # the first alone; the two still wanted together
    assert encodes.stats.summary()["prompts"] == 2


def test_encode_batch_max_caps_the_prompts_of_a_call(
    models_dir: Path, text_encoder: Callable[..., TextEncoder]
) -> None:
    loaded = model(models_dir, "builtin/tiny-sd")
    kwargs = [call(i, guidance_scale=1.0) for i in range(4)]  # no guidance: one forward per call
    pipes = [new_pipe(loaded) for _ in kwargs]
    encodes = EncodeGroups(2)
    held = text_encoder(loaded, until=lambda: encodes.queued == 3)
    for future in arrive_together(pipes, kwargs, encodes, held.held):
        future.result()
    assert held.rows == [1, 2, 1]  # the first alone, two of the three queued, then the last (alone)
    assert encodes.stats.summary() == {"batches": 1, "prompts": 2, "mean_prompts": 2.0, "fallbacks": 0}
    off = EncodeGroups(1)  # ENCODE_BATCH_MAX=1: no one queues, each encodes alone
    counted = text_encoder(loaded)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: denoise.prepare(pipes[i], call(i, guidance_scale=1.0), off), range(4)))
    assert counted.rows == [1, 1, 1, 1]
    assert off.stats.batches == 0


def test_runner_requests_that_arrive_together_share_an_encode(
    models_dir: Path, text_encoder: Callable[..., TextEncoder]
) -> None:
    """Through the runner, as the engine serves them: whichever request encodes first is held until the other two
    have queued behind it."""
    requests = [GenerateRequest(prompt=f"a red barn {i}", seed=i, num_inference_steps=3) for i in range(3)]
    runner, steps, expected = shared_runner(models_dir, requests)
    held = text_encoder(runner.store.get(requests[0]), until=lambda: steps.encodes.queued == 2)
    results = run_together(runner, steps, requests)
    assert max(held.rows) == 2
    assert steps.stats().encode.summary() == {"batches": 1, "prompts": 2, "mean_prompts": 2.0, "fallbacks": 0}
    assert_as_alone(results, expected)
