"""Requests whose last steps run in the same round decode in one VAE call, on the tiny models: each request gets
the images it gets decoding alone, and the call really is one (the VAE's decode is counted).

The batched VAE call is not bit-identical to one call per request on a CPU (measured on the tiny VAEs: up to 8e-6
apart in the VAE's output), so the images are held to support/tiny.py's bound, the batched UNet steps' bound.
"""

from __future__ import annotations

import copy
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffusers_api.config import Settings
from diffusers_api.denoising import Denoiser, Rendezvous, SharedSteps
from diffusers_api.denoising import tasks as denoise
from diffusers_api.denoising.decoding import decode_key
from diffusers_api.denoising.tasks import DenoiseTask, float32_vae
from diffusers_api.engine import make_engine
from diffusers_api.models.store import LoadedModel
from diffusers_api.schema import GenerateRequest
from support.tiny import MODELS, assert_as_alone, assert_close, call, model, new_pipe, shared_runner
from support.together import run_together


class Requests:
    """Prepared requests of one model, stepped together in one Denoiser so that they finish in one round."""

    def __init__(self, loaded: LoadedModel, calls: list[dict[str, Any]], decode_batch_max: int = 8) -> None:
        self.calls = calls
        self.pipes = [new_pipe(loaded) for _ in calls]
        self.denoiser = Denoiser(Rendezvous(max_wait_s=5.0), decode_batch_max=decode_batch_max)
        self.tasks: list[DenoiseTask] = []

    def run(self) -> None:
        self.tasks = [denoise.prepare(pipe, kwargs) for pipe, kwargs in zip(self.pipes, self.calls, strict=True)]
        self.denoiser.submit(*self.tasks)  # all in the first round, so all finish in the last
        for task in self.tasks:
            assert task.done.wait(60)
        self.denoiser.stop()
        assert all(task.error is None and task.finished for task in self.tasks)
        assert self.denoiser.stats.rounds == 2

    def finish(self, indexes: list[int]) -> list[Any]:
        """The requests' `finish`, each on a thread of its own as the request threads do it."""
        with ThreadPoolExecutor(max_workers=len(indexes)) as pool:
            outputs = pool.map(lambda i: denoise.finish(self.pipes[i], self.tasks[i], self.calls[i]), indexes)
            return [np.asarray(output.images[0]).astype(int) for output in outputs]

    def alone(self, indexes: list[int]) -> list[Any]:
        """The reference: the same final latents, each request decoding alone."""
        for i in indexes:
            self.tasks[i].decode_group = None
        return self.finish(indexes)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`watch(vae)` counts that VAE's calls: the rows of each, in the order made."""

    def watch(vae: Any, fail: type[Exception] | None = None) -> list[int]:
        rows: list[int] = []
        original = vae.decode

        def counted(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            rows.append(int(latents.shape[0]))
            if fail is not None and latents.shape[0] > 1 and len(rows) == 1:
                raise fail("the batched decode failed (as the test asks)")
            return original(latents, *args, **kwargs)

        monkeypatch.setattr(vae, "decode", counted)
        return rows

    return watch


@pytest.mark.parametrize("model_id", list(MODELS), ids=lambda name: name.removeprefix("builtin/"))
def test_requests_finishing_together_decode_in_one_call(models_dir: Path, model_id: str, decodes: Any) -> None:
    loaded = model(models_dir, model_id)
    size = MODELS[model_id]
    requests = Requests(loaded, [call(1, **size), call(2, images=2, **size), call(4, **size)])
    requests.run()
    rows = decodes(loaded.pipelines.components["vae"])
    together = requests.finish([0, 1, 2])
    assert rows == [4]  # one VAE call for the three requests' four images
    assert requests.denoiser.decode_stats.summary() == {"batches": 1, "images": 4, "mean_images": 4, "fallbacks": 0}
    alone = requests.alone([0, 1, 2])
    assert sorted(rows[1:]) == [1, 1, 2]
    for batched, solo in zip(together, alone, strict=True):
        assert_close(batched, solo)


def test_sdxl_upcast_and_latents_mean_and_std(models_dir: Path, decodes: Any) -> None:
    """An fp16 VAE that asks for `force_upcast` decodes with its float32 copy, from float32 latents, batched as
    alone; and a VAE with latents_mean and latents_std undoes them per request."""
    loaded = model(models_dir, "builtin/tiny-sdxl")
    vae = copy.deepcopy(loaded.pipelines.components["vae"]).to(torch.float16)
    vae.register_to_config(force_upcast=True, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    requests = Requests(loaded, [call(1), call(2, images=2)])
    for pipe in requests.pipes:  # each request's own pipeline object: the shared one is untouched
        object.__setattr__(pipe, "vae", vae)
    requests.run()
    assert denoise._needs_upcast(vae)
    rows = decodes(float32_vae(vae).module)
    together = requests.finish([0, 1])
    assert rows == [3]
    alone = requests.alone([0, 1])
    assert sorted(rows[1:]) == [1, 2]
    for batched, solo in zip(together, alone, strict=True):
        assert_close(batched, solo)


def test_flux_sizes_that_pack_alike_decode_apart(models_dir: Path, decodes: Any) -> None:
    """64x32 and 32x64 pack into tokens of one shape but unpack differently: only same-size requests share a call."""
    loaded = model(models_dir, "builtin/tiny-flux")
    wide, tall = {"height": 32, "width": 64}, {"height": 64, "width": 32}
    requests = Requests(loaded, [call(1, **wide), call(2, **tall), call(3, **wide)])
    requests.run()
    assert requests.tasks[0].latents.shape == requests.tasks[1].latents.shape
    rows = decodes(loaded.pipelines.components["vae"])
    together = requests.finish([0, 1, 2])
    assert sorted(rows) == [1, 2]
    assert requests.tasks[1].decode_group is None
    alone = requests.alone([0, 2])
    for batched, solo in zip([together[0], together[2]], alone, strict=True):
        assert_close(batched, solo)


def test_a_member_cancelled_after_the_round_is_left_out(models_dir: Path, decodes: Any) -> None:
    loaded = model(models_dir, "builtin/tiny-sd")
    cancel = threading.Event()
    requests = Requests(loaded, [call(1), call(2), call(3)])
    requests.run()
    rows = decodes(loaded.pipelines.components["vae"])
    cancel.set()  # after its last step: its request went away while the others decode
    requests.tasks[1].cancel = cancel
    together = requests.finish([0, 2])
    assert rows == [2]  # the two others, in one call, without the cancelled one's rows
    requests.finish([1])  # were it still asked for, it decodes alone
    assert rows == [2, 1]
    alone = requests.alone([0, 2])
    for batched, solo in zip(together, alone, strict=True):
        assert_close(batched, solo)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError], ids=["out-of-memory", "error"])
def test_a_failing_batched_decode_falls_back_to_each_alone(
    models_dir: Path, decodes: Any, error: type[Exception]
) -> None:
    loaded = model(models_dir, "builtin/tiny-sd3")
    size = MODELS["builtin/tiny-sd3"]
    requests = Requests(loaded, [call(1, **size), call(2, images=2, **size), call(4, **size)])
    requests.run()
    rows = decodes(loaded.pipelines.components["vae"], fail=error)
    together = requests.finish([0, 1, 2])
    assert rows[0] == 4  # the failed call
    assert sorted(rows[1:]) == [1, 1, 2]  # then one each
    assert requests.denoiser.decode_stats.summary() == {"batches": 0, "images": 0, "mean_images": 0, "fallbacks": 1}
    # running out of memory halves the cap of that VAE and shape (4 images failed: 2), another error does not
    cap = requests.denoiser.decode_caps.of(decode_key(requests.tasks[0]), 8)
    assert cap == (2 if error is torch.cuda.OutOfMemoryError else 8)
    alone = requests.alone([0, 1, 2])
    for batched, solo in zip(together, alone, strict=True):
        assert np.array_equal(batched, solo)  # decoded alone both times


def test_a_lowered_cap_holds_for_its_shape_alone_until_the_vae_goes(models_dir: Path) -> None:
    """After a batched decode of 4 images ran out of memory, requests of that shape decode in pairs, those of
    another shape as before; a cap of 1 is no group. The caps go with the VAE (held weakly)."""
    loaded = model(models_dir, "builtin/tiny-sd")
    small = {"height": 32, "width": 32}
    requests = Requests(loaded, [call(i) for i in range(4)] + [call(i, **small) for i in range(4, 7)])
    caps = requests.denoiser.decode_caps
    caps.lower(decode_key(denoise.prepare(new_pipe(loaded), call(0))), 4)
    caps.lower(decode_key(denoise.prepare(new_pipe(loaded), call(0))), 8)  # a higher cap does not raise it
    requests.run()
    sizes = [len(task.decode_group.tasks) if task.decode_group else 1 for task in requests.tasks]
    assert sizes == [2, 2, 2, 2, 3, 3, 3]
    caps.lower(decode_key(requests.tasks[4]), 3)
    assert caps.of(decode_key(requests.tasks[4]), 8) == 1
    again = Requests(loaded, [call(i, **small) for i in range(4, 6)])
    again.denoiser.decode_caps = caps
    again.run()
    assert all(task.decode_group is None for task in again.tasks)
    vae = copy.deepcopy(loaded.pipelines.components["vae"])
    caps.lower((vae, *decode_key(requests.tasks[4])[1:]), 2)
    assert len(caps._caps) == 2
    del vae
    gc.collect()
    assert len(caps._caps) == 1


def test_decode_batch_max_caps_the_images_of_a_call(models_dir: Path, decodes: Any) -> None:
    loaded = model(models_dir, "builtin/tiny-sd")
    requests = Requests(loaded, [call(i) for i in range(4)] + [call(9, images=3)], decode_batch_max=3)
    requests.run()
    rows = decodes(loaded.pipelines.components["vae"])
    requests.finish([0, 1, 2, 3, 4])
    assert sorted(rows) == [1, 3, 3]  # 3 + 1 that is left alone; the 3-image request has no room for company
    off = Requests(loaded, [call(1), call(2)], decode_batch_max=1)
    off.run()
    assert all(task.decode_group is None for task in off.tasks)


def test_the_settings_reach_the_shared_steps_and_their_counters_are_reported(models_dir: Path) -> None:
    """DECODE_BATCH_MAX and ENCODE_BATCH_MAX (test_batched_encode.py), and /health's counters of both."""
    settings = Settings(model_id="builtin/tiny-sd", models_dir=models_dir, decode_batch_max=3, encode_batch_max=4)
    steps = make_engine(settings).runner.steps  # type: ignore[attr-defined]
    assert isinstance(steps, SharedSteps)
    assert (steps.denoiser.decode_batch_max, steps.encodes.max_prompts) == (3, 4)
    steps.denoiser.decode_stats.count(3)
    steps.encodes.stats.count(4)
    steps.encodes.stats.count_fallback()
    batching = steps.stats().summary()["batching"]
    assert batching["decode"] == {"batches": 1, "images": 3, "mean_images": 3.0, "fallbacks": 0}
    assert batching["encode"] == {"batches": 1, "prompts": 4, "mean_prompts": 4.0, "fallbacks": 1}
    steps.stop()


def test_runner_requests_that_finish_together_share_a_decode(models_dir: Path) -> None:
    """Through the runner, as the engine serves them (safety checker and post-processing per request)."""
    requests = [GenerateRequest(prompt=f"a red barn {i}", seed=i, num_inference_steps=3) for i in range(3)]
    runner, steps, expected = shared_runner(models_dir, requests)
    results = run_together(runner, steps, requests)
    decode = steps.stats().decode
    assert decode.batches >= 1  # the first request may lead the others by a round (support/together.py)
    assert decode.items >= 2
    assert_as_alone(results, expected)
