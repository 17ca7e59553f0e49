"""PixArt-Sigma in our loop, on builtin/tiny-pixart: the same latents and images as diffusers' own call, alone
and batched (within test_denoise.py's bound), with each row's T5 attention mask going with its embeddings."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import Denoiser, Rendezvous, SharedSteps
from diffusers_api.denoising import tasks as denoise
from diffusers_api.denoising.graphs import CudaGraphForward
from diffusers_api.denoising.tasks import DenoiseTask
from diffusers_api.errors import InvalidInputs
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest
from support.together import run_together

MODEL_ID = "builtin/tiny-pixart"
BATCHED_RTOL = 1e-5  # as tests/integration/test_denoise.py bounds SD3 and Flux
# Without resolution binning a 64x64 image is 16x16 latents (64 tokens): binned, it would be denoised at 256x256.
SMALL = {"height": 64, "width": 64, "use_resolution_binning": False}


@pytest.fixture(scope="module")
def runner(models_dir: Path) -> Runner:
    runner = Runner(Settings(model_id=MODEL_ID, models_dir=models_dir))
    runner.start()
    return runner


def new_pipe(runner: Runner, device: str | None = None) -> Any:
    """A pipeline of its own (a request's: its own scheduler, whose state is per request) over the shared model."""
    pipelines = runner.store.get(GenerateRequest(prompt="x")).pipelines
    scheduler = pipelines.scheduler("DPMSolverMultistepScheduler")
    built = pipelines.build(pipelines.resolve("txt2img"), scheduler, safety_checker=False)
    built.set_progress_bar_config(disable=True)
    return built if device is None else built.to(device)


@pytest.fixture(scope="module")
def pipe(runner: Runner) -> Any:
    return new_pipe(runner)


@pytest.fixture
def denoiser() -> Iterator[Denoiser]:
    loop = Denoiser(Rendezvous(max_wait_s=5.0))
    yield loop
    loop.stop()


def call(seed: int, images: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Pipeline arguments; fresh generators every time (they carry state)."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(images)]
    defaults = {"prompt": f"a red barn {seed}", "num_inference_steps": 3, "clean_caption": False}
    return defaults | {"num_images_per_prompt": images, "generator": generators} | kwargs


def calls() -> list[dict[str, Any]]:
    """Guided (the default 4.5), unguided, and guided with a negative prompt and two images: prompts of other
    lengths, so that every guided row has its own attention mask."""
    return [
        call(60, **SMALL),
        call(61, guidance_scale=1.0, prompt="a cat", **SMALL),
        call(
            62,
            images=2,
            guidance_scale=7.0,
            prompt="an old tree by the sea at night",
            negative_prompt="blurry dark",
            **SMALL,
        ),
    ]


def reference(pipe: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    latents: torch.Tensor = pipe(**kwargs, output_type="latent").images
    return latents


def run_all(denoiser: Denoiser, jobs: list[DenoiseTask]) -> None:
    """Submit every job at once, the loop held at the rendezvous until all are in (so that they share rounds)."""
    threads = [threading.Thread(target=denoiser.run, args=(job,)) for job in jobs]
    with denoiser.rendezvous._cond:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while denoiser.stats.jobs < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.005)
    for thread in threads:
        thread.join(120)


def test_equal_to_diffusers_alone_and_batched(runner: Runner, pipe: Any, denoiser: Denoiser) -> None:
    expected = [reference(pipe, kwargs) for kwargs in calls()]
    masks = []
    for kwargs, want in zip(calls(), expected, strict=True):
        assert denoise.supports(pipe, kwargs)
        alone = denoise.prepare(new_pipe(runner), kwargs)
        assert alone.learned_sigma
        assert alone.added is not None
        masks.append(alone.added["encoder_attention_mask"])
        denoiser.run(alone)
        assert torch.equal(alone.latents, want)
    assert len({int(mask.sum()) for mask in masks}) == 3  # the texts' masks differ row by row
    jobs = [denoise.prepare(new_pipe(runner), kwargs) for kwargs in calls()]
    together = Denoiser(Rendezvous(max_wait_s=5.0))
    try:
        run_all(together, jobs)
    finally:
        together.stop()
    assert together.stats.max_jobs == 3
    assert max(together.rendezvous.stats.rows) == 2 + 1 + 4  # one forward: guided rows twice, unguided once
    for job, want in zip(jobs, expected, strict=True):
        assert job.error is None
        bound = BATCHED_RTOL * float(want.abs().max())
        assert float((job.latents - want).abs().max()) <= bound


def test_binned_resolution_gives_the_pipelines_images(runner: Runner, pipe: Any, denoiser: Denoiser) -> None:
    """The default `use_resolution_binning`: denoised at the closest 256-pixel bin, resized to the size asked."""
    kwargs = call(63, height=64, width=96)
    expected = pipe(**kwargs, output_type="pil").images[0]
    job = denoise.prepare(new_pipe(runner), call(63, height=64, width=96))
    assert job.latents.shape[-2:] != (16, 24)  # the bin's latents, not the asked size's
    denoiser.run(job)
    image = denoise.finish(pipe, job, {}).images[0]
    assert image.size == (96, 64)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_supports_only_what_the_loop_reproduces(pipe: Any) -> None:
    assert denoise.supports(pipe, call(1, max_sequence_length=64, eta=0.0))
    assert denoise.supports(pipe, {"prompt": "a barn"})  # clean_caption left out: ours encodes the prompt as given
    assert not denoise.supports(pipe, call(1, clean_caption=True))  # needs bs4 and ftfy: diffusers' call
    assert not denoise.supports(pipe, call(1, output_type="latent"))
    assert not denoise.supports(pipe, call(1, sigmas=[1.0, 0.5]))
    assert not denoise.supports(pipe, call(1, callback_steps=2))


@pytest.mark.parametrize("length", [0, -3, 2.5])
def test_a_bad_max_sequence_length_is_invalid_inputs(runner: Runner, length: Any) -> None:
    steps = SharedSteps(Rendezvous(max_wait_s=5.0))
    try:
        with pytest.raises(InvalidInputs, match="max_sequence_length"):
            steps.denoise(new_pipe(runner), call(1, max_sequence_length=length, **SMALL), None, None)
    finally:
        steps.stop()


def test_a_model_with_micro_conditions_is_left_to_diffusers(pipe: Any) -> None:
    """PixArt-Alpha-like configs condition on resolution and aspect ratio, which the Sigma pipeline never gives."""
    config = dict(pipe.transformer.config) | {"use_additional_conditions": True}
    transformer = type(pipe.transformer).from_config(config)
    alpha_like = type(pipe)(**(pipe.components | {"transformer": transformer}))
    assert not denoise.supports(alpha_like, call(1))


def test_runner_batches_pixart_requests(runner: Runner) -> None:
    """Through the runner: $meta.LOOP says ours, and two requests stepped together give what each gives alone
    through diffusers' own call (to within one 8-bit level on under 1% of the pixels, as for SD)."""
    requests = [
        GenerateRequest(
            prompt="a red barn",
            seed=7,
            num_inference_steps=3,
            width=64,
            height=64,
            extra={"use_resolution_binning": False},
        ),
        GenerateRequest(
            prompt="a cat in the snow",
            seed=8,
            num_inference_steps=3,
            guidance_scale=6.0,
            width=64,
            height=64,
            extra={"use_resolution_binning": False},
        ),
    ]
    alone = [runner.run(request) for request in requests]
    assert {result.meta["LOOP"] for result in alone} == {"diffusers"}
    steps = SharedSteps(Rendezvous(max_wait_s=5.0))
    batched = Runner(runner.settings, store=runner.store, steps=steps)
    together = run_together(batched, steps, requests)
    assert [result.meta["LOOP"] for result in together] == ["batched", "batched"]
    assert together[0].meta["PIPELINE"] == "PixArtSigmaPipeline"
    assert steps.denoiser.stats.max_jobs == 2
    for ours, theirs in zip(together, alone, strict=True):
        difference = np.abs(pixels(ours) - pixels(theirs))
        assert difference.max() <= 1
        assert (difference > 0).mean() <= 0.01


def pixels(result: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_replay_pixart_steps(runner: Runner) -> None:
    """On a GPU the transformer's steps (with their masks and micro-conditions) replay as CUDA graphs, and give
    what the eager steps give, to within the kernels' rounding."""
    graphs = CudaGraphForward()
    results = {}
    for name, forward in (("eager", None), ("graphs", graphs)):
        loop = Denoiser(Rendezvous(forward=forward, max_wait_s=5.0))
        jobs = [denoise.prepare(new_pipe(runner, "cuda"), kwargs) for kwargs in calls()]
        try:
            run_all(loop, jobs)
        finally:
            loop.stop()
        assert all(job.error is None for job in jobs)
        results[name] = [job.latents for job in jobs]
    assert graphs.captures >= 1
    assert graphs.replays >= 3
    for graphed, eager in zip(results["graphs"], results["eager"], strict=True):
        # padded to the bucket's 8 rows, with TF32 kernels of other shapes: rounding over 3 steps, where a stale
        # input or a misplaced mask would be off by the latents' own magnitude (about 1)
        torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2)
