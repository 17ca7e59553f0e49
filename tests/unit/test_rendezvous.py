"""The rendezvous of UNet calls (denoising/rendezvous.py): rounds, merging, waits, failures."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from diffusers_api.denoising import Rendezvous


@dataclass
class FakeUNet:
    """noise = sample * 2 + timestep: each row's answer depends only on that row, as a real UNet's does."""

    batches: list[int] = field(default_factory=list)
    fail_on_rows: int | None = None
    broken: bool = False  # every forward fails
    config: str = "fake-config"
    compute_s: float = 0.005  # a forward takes time, as a real one does: the other loops catch up meanwhile

    def __call__(self, sample: Any, t: Any, encoder_hidden_states: Any = None, **kwargs: Any) -> Any:
        time.sleep(self.compute_s)
        self.batches.append(int(sample.shape[0]))
        if self.broken or self.fail_on_rows == sample.shape[0]:
            raise RuntimeError("device fault")
        t = t if torch.is_tensor(t) else torch.tensor(float(t))
        noise = sample * 2 + t.reshape(-1, 1).float().expand(sample.shape[0], 1)
        noise = noise + encoder_hidden_states.sum(dim=(1, 2)).reshape(-1, 1)
        return (noise,) if not kwargs.get("return_dict", True) else type("Out", (), {"sample": noise})()


@dataclass
class FakePipe:
    unet: FakeUNet
    _num_timesteps: int = 3


def loop(batcher: Rendezvous, pipe: FakePipe, start: float, steps: int, **extra: Any) -> list[torch.Tensor]:
    """A denoising loop in miniature: one UNet call per step, like diffusers' loops."""
    pipe._num_timesteps = steps
    outputs = []
    with batcher.session(pipe):
        for step in range(steps):
            sample = torch.full((2, 1), start + step)
            hidden = torch.ones(2, 3, 4)
            outputs.append(pipe.unet(sample, 999 - step, encoder_hidden_states=hidden, return_dict=False, **extra)[0])
    return outputs


def expected(start: float, steps: int) -> list[torch.Tensor]:
    return [torch.full((2, 1), (start + step) * 2 + (999 - step) + 12.0) for step in range(steps)]


def run_loops(batcher: Rendezvous, unet: FakeUNet, starts: list[float], steps: int, **extra: Any) -> list[Any]:
    with ThreadPoolExecutor(max_workers=len(starts)) as pool:
        futures = [pool.submit(loop, batcher, FakePipe(unet), start, steps, **extra) for start in starts]
        return [future.result() for future in futures]


def test_concurrent_loops_share_one_forward_per_step() -> None:
    unet, batcher = FakeUNet(), Rendezvous(max_wait_s=5.0)
    results = run_loops(batcher, unet, [1.0, 10.0, 100.0], steps=8)
    for start, outputs in zip([1.0, 10.0, 100.0], results, strict=True):
        torch.testing.assert_close(outputs, expected(start, 8))
    # a loop joins at its first call, so the first step or two may run before all three have arrived
    assert unet.batches.count(6) >= 5
    assert batcher.participants == 0


def test_proxy_forwards_attributes_and_is_removed_after_the_session() -> None:
    unet, batcher = FakeUNet(), Rendezvous()
    pipe = FakePipe(unet)
    with batcher.session(pipe):
        assert pipe.unet is not unet
        assert pipe.unet.config == "fake-config"
    assert pipe.unet is unet


def test_unbatchable_calls_run_alone_within_the_round() -> None:
    unet, batcher = FakeUNet(), Rendezvous(max_wait_s=5.0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        plain = pool.submit(loop, batcher, FakePipe(unet), 1.0, 3)
        special = pool.submit(loop, batcher, FakePipe(unet), 5.0, 3, cross_attention_kwargs={"scale": 0.5})
        torch.testing.assert_close(plain.result(), expected(1.0, 3))
        torch.testing.assert_close(special.result(), expected(5.0, 3))
    assert max(unet.batches) == 2  # never merged


def run_together(batcher: Rendezvous, unet: FakeUNet, starts: tuple[float, ...], steps: int) -> list[Any]:
    """Loops that start at the same moment; each future's result or exception."""
    barrier = threading.Barrier(len(starts))

    def guarded(start: float) -> Any:
        barrier.wait()
        return loop(batcher, FakePipe(unet), start, steps)

    with ThreadPoolExecutor(max_workers=len(starts)) as pool:
        futures = [pool.submit(guarded, start) for start in starts]
        return [future.exception(timeout=30) or future.result() for future in futures]


def test_a_failed_merged_forward_is_retried_call_by_call() -> None:
    """E.g. a merged step too big for the device's memory: each call alone fits, and every loop completes."""
    unet, batcher = FakeUNet(fail_on_rows=4), Rendezvous(max_wait_s=5.0)
    results = run_together(batcher, unet, (1.0, 2.0), 6)
    for start, outputs in zip((1.0, 2.0), results, strict=True):
        torch.testing.assert_close(outputs, expected(start, 6))
    assert 4 in unet.batches  # they did meet, and the merged attempt failed
    assert batcher.participants == 0


def test_a_forward_that_fails_alone_fails_its_caller_and_the_batcher_goes_on() -> None:
    unet, batcher = FakeUNet(broken=True), Rendezvous(max_wait_s=5.0)
    results = run_together(batcher, unet, (1.0, 2.0), 6)
    assert all(isinstance(result, RuntimeError) for result in results)
    assert batcher.participants == 0
    unet.broken = False
    torch.testing.assert_close(loop(batcher, FakePipe(unet), 3.0, 2), expected(3.0, 2))


def test_a_straggler_delays_the_others_by_at_most_max_wait() -> None:
    unet, batcher = FakeUNet(), Rendezvous(max_wait_s=0.05)
    stuck = FakePipe(unet)
    release = threading.Event()

    def stuck_loop() -> None:
        with batcher.session(stuck):
            stuck.unet(torch.zeros(2, 1), 1, encoder_hidden_states=torch.ones(2, 3, 4), return_dict=False)
            release.wait(10)  # inside its loop, never calling again until released

    with ThreadPoolExecutor(max_workers=2) as pool:
        holder = pool.submit(stuck_loop)
        time.sleep(0.1)
        started = time.perf_counter()
        outputs = loop(batcher, FakePipe(unet), 1.0, 5)
        elapsed = time.perf_counter() - started
        release.set()
        holder.result()
    torch.testing.assert_close(outputs, expected(1.0, 5))
    assert elapsed < 5 * 0.05 + 1.0


@pytest.mark.parametrize("return_dict", [True, False], ids=["output-object", "tuple"])
def test_output_shape_follows_return_dict(return_dict: bool) -> None:
    batcher = Rendezvous()
    pipe = FakePipe(FakeUNet(), _num_timesteps=1)
    with batcher.session(pipe):
        out = pipe.unet(torch.zeros(2, 1), 5, encoder_hidden_states=torch.ones(2, 3, 4), return_dict=return_dict)
    noise = out.sample if return_dict else out[0]
    torch.testing.assert_close(noise, torch.full((2, 1), 17.0))
