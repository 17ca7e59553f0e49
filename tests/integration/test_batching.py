"""Step-level batching on the tiny models: concurrent requests share UNet calls and still get their own images."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import Rendezvous, SharedSteps
from diffusers_api.engine import BatchingEngine
from diffusers_api.errors import Cancelled, InvalidInputs
from diffusers_api.generation import Generation
from diffusers_api.imaging import encode_image, to_base64
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, GenerateResult
from support.together import in_one_batch

# Batched and unbatched kernels may round differently in the last float bits; after 8-bit quantisation that
# shows as at most one level on a small share of pixels. These bounds are what the tests assert.
MAX_LEVEL_DIFFERENCE = 1
MAX_DIFFERING_SHARE = 0.01

SCHEDULERS = ["DPM++ 2M", "Euler a", "Heun", "DPM++ 2M SDE"]


def _runner(models_dir: Path, model_id: str) -> Runner:
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir))
    runner.start()
    return runner


@pytest.fixture(scope="module")
def runner(models_dir: Path) -> Runner:
    return _runner(models_dir, "builtin/tiny-sd")


def pixels(result: GenerateResult, index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index]))).astype(int)


def assert_close(batched: np.ndarray, alone: np.ndarray) -> None:
    difference = np.abs(batched - alone)
    assert difference.max() <= MAX_LEVEL_DIFFERENCE
    assert (difference > 0).mean() <= MAX_DIFFERING_SHARE


# Our own loop (SD/SDXL), and diffusers' own loop with its UNet calls merged by the batcher (other pipelines).
LOOPS = ["batched", "diffusers"]


@contextmanager
def batching(runner: Runner, batcher: Rendezvous | None = None, loop: str = "batched") -> Iterator[Runner]:
    """A runner on `runner`'s models as the batching engine builds it: UNet calls meet in `batcher`; SD/SDXL run
    in our loop (or, with loop="diffusers", in diffusers' own)."""
    steps = SharedSteps(batcher or Rendezvous(max_wait_s=5.0), own_loop=loop == "batched")
    try:
        yield Runner(runner.settings, store=runner.store, steps=steps)
    finally:
        steps.stop()


def run_alone(runner: Runner, requests: list[GenerateRequest]) -> list[GenerateResult]:
    """The reference: each request alone, through the pipeline's own call."""
    assert runner.steps is None
    return [runner.run(request) for request in requests]


def run_together(
    runner: Runner, requests: list[GenerateRequest], batcher: Rendezvous | None = None, loop: str = "batched"
) -> list[GenerateResult]:
    with batching(runner, batcher, loop) as batched, ThreadPoolExecutor(max_workers=len(requests)) as pool:

        def submit() -> list[Future[GenerateResult]]:
            return [pool.submit(batched.run, request) for request in requests]

        # diffusers' own loop has no such hold: its calls meet at the rendezvous as they come
        futures = in_one_batch(batched.steps, len(requests), submit) if loop == "batched" else submit()  # type: ignore[arg-type]
        results = [future.result() for future in futures]
    assert [result.meta["LOOP"] for result in results] == [loop] * len(requests)
    return results


def varied_requests(count: int, **common: object) -> list[GenerateRequest]:
    prompts = ["a red barn", "blue sky over the sea", "a cat", "an old tree", "city street at night"]
    return [
        GenerateRequest(
            **{
                "prompt": prompts[i % len(prompts)],
                "seed": 100 + i,
                "num_inference_steps": 4 + 2 * (i % 3),
                "guidance_scale": [7.5, 3.0, 1.0, 5.0][i % 4],
                **common,
            }
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)  # latents per scheduler: tests/integration/test_denoise.py
def test_batched_requests_match_their_solo_results(runner: Runner, scheduler: str, loop: str) -> None:
    requests = varied_requests(3, scheduler=scheduler)
    alone = run_alone(runner, requests)
    batcher = Rendezvous(max_wait_s=5.0)
    together = run_together(runner, requests, batcher, loop)
    assert max(batcher.stats.rows) > 2  # calls were really merged (CFG rows of several requests)
    for batched, solo in zip(together, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


def test_batched_results_match_plain_diffusers(runner: Runner) -> None:
    """Our result is the diffusers pipeline's own result: same call, only the UNet's batch differs."""
    requests = varied_requests(3, scheduler="Euler a")
    together = run_together(runner, requests)
    model = runner.store.get(requests[0])
    for request, batched in zip(requests, together, strict=True):
        pipe = model.pipelines.build(
            model.pipelines.resolve("txt2img"), model.pipelines.scheduler("Euler a"), safety_checker=True
        )
        output = pipe(
            request.prompt,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(request.seed or 0)],
            output_type="np",
        )
        plain = (output.images[0] * 255).round().astype(int)
        assert_close(pixels(batched), plain)


def test_several_images_per_request_in_a_batch(runner: Runner) -> None:
    requests = [
        GenerateRequest(prompt="a cat", seed=5, num_images_per_prompt=2, num_inference_steps=6),
        GenerateRequest(prompt="a dog", seed=9, num_inference_steps=6),
    ]
    alone = run_alone(runner, requests)
    together = run_together(runner, requests)
    assert together[0].seeds == [5, 6]
    for index in range(2):
        assert_close(pixels(together[0], index), pixels(alone[0], index))
    assert_close(pixels(together[1]), pixels(alone[1]))


def test_img2img_and_txt2img_share_a_batch(runner: Runner) -> None:
    image = to_base64(encode_image(Image.new("RGB", (64, 64), (180, 40, 40))))
    requests = [
        GenerateRequest(prompt="a cat", seed=1, num_inference_steps=8),
        GenerateRequest(prompt="a dog", seed=2, num_inference_steps=10, image=image, strength=0.8),
    ]
    alone = run_alone(runner, requests)
    together = run_together(runner, requests)
    for batched, solo in zip(together, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


def test_sdxl_batched(models_dir: Path) -> None:
    runner = _runner(models_dir, "builtin/tiny-sdxl")
    requests = varied_requests(3)
    alone = run_alone(runner, requests)
    batcher = Rendezvous(max_wait_s=5.0)
    together = run_together(runner, requests, batcher)
    assert max(batcher.stats.rows) > 2
    for batched, solo in zip(together, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


def test_sdxl_img2img_batched(models_dir: Path) -> None:
    runner = _runner(models_dir, "builtin/tiny-sdxl")
    image = to_base64(encode_image(Image.new("RGB", (64, 64), (40, 120, 200))))
    requests = varied_requests(2, image=image, strength=0.7)
    alone = run_alone(runner, requests)
    together = run_together(runner, requests)
    assert together[0].meta["PIPELINE"] == "StableDiffusionXLImg2ImgPipeline"
    for batched, solo in zip(together, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


@pytest.mark.parametrize("padding_mask_crop", [None, 8], ids=["our-loop", "diffusers-loop"])
@pytest.mark.parametrize("model_id", ["builtin/tiny-sd-inpaint", "builtin/tiny-sdxl-inpaint"], ids=["sd", "sdxl"])
def test_inpaint_batched(models_dir: Path, model_id: str, padding_mask_crop: int | None) -> None:
    """Inpainting runs in our loop; with an option our loop does not reproduce (padding_mask_crop) it keeps
    diffusers' own loop, whose UNet calls are merged all the same."""
    runner = _runner(models_dir, model_id)
    image = to_base64(encode_image(Image.new("RGB", (64, 64), (90, 90, 90))))
    mask = Image.new("RGB", (64, 64), (0, 0, 0))
    mask.paste((255, 255, 255), (16, 16, 48, 48))
    extra = {"padding_mask_crop": padding_mask_crop} if padding_mask_crop else {}
    requests = varied_requests(2, image=image, mask_image=to_base64(encode_image(mask)), extra=extra)
    alone = run_alone(runner, requests)
    batcher = Rendezvous(max_wait_s=5.0)
    with batching(runner, batcher) as batched, ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(batched.run, requests))
    assert {result.meta["LOOP"] for result in together} == {"diffusers" if padding_mask_crop else "batched"}
    assert max(batcher.stats.rows) > 2
    for batched, solo in zip(together, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


def test_both_loops_share_their_forwards(models_dir: Path, runner: Runner) -> None:
    """A request in our loop and one in diffusers' loop (another runner on the same model) meet in one forward."""
    requests = varied_requests(2, num_inference_steps=8, guidance_scale=7.5)
    alone = run_alone(runner, requests)
    batcher = Rendezvous(max_wait_s=5.0)
    with (
        batching(runner, batcher, "batched") as ours_runner,
        batching(runner, batcher, "diffusers") as other,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        ours, theirs = pool.submit(ours_runner.run, requests[0]), pool.submit(other.run, requests[1])
        results = [ours.result(), theirs.result()]
    assert [result.meta["LOOP"] for result in results] == ["batched", "diffusers"]
    assert 4 in batcher.stats.rows  # two CFG rows from each loop in one forward
    for batched, solo in zip(results, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


def test_different_resolutions_run_as_separate_groups(runner: Runner) -> None:
    requests = [
        GenerateRequest(prompt="a", seed=1, num_inference_steps=5, width=64, height=64),
        GenerateRequest(prompt="b", seed=2, num_inference_steps=5, width=96, height=64),
    ]
    alone = run_alone(runner, requests)
    batcher = Rendezvous(max_wait_s=5.0)
    together = run_together(runner, requests, batcher)
    assert max(batcher.stats.rows) == 2  # never mixed in one forward
    for batched, solo in zip(together, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


def test_a_new_request_joins_at_the_next_step(runner: Runner) -> None:
    first_steps: list[int] = []
    joined_at: list[int] = []

    with batching(runner) as batched:
        assert batched.steps is not None
        denoiser, batcher = batched.steps.denoiser, batched.steps.rendezvous

        def first_progress(step: int, total: int) -> None:
            first_steps.append(step)
            if step == 3:  # hold the loop (progress runs on it) until the second request is waiting to join
                second = pool.submit(
                    batched.run, GenerateRequest(prompt="b", seed=2, num_inference_steps=4), second_progress
                )
                futures.append(second)
                deadline = time.monotonic() + 60
                while denoiser.stats.jobs < 2 and time.monotonic() < deadline:
                    time.sleep(0.005)

        def second_progress(step: int, total: int) -> None:
            if not joined_at:
                joined_at.append(len(first_steps))

        futures: list = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            long = pool.submit(batched.run, GenerateRequest(prompt="a", seed=1, num_inference_steps=12), first_progress)
            long.result()
            futures[0].result()
    # steps 1-3 ran the first request alone (2 CFG rows); the second joined at the very next step boundary
    assert batcher.stats.rows[:5] == [2, 2, 2, 4, 4]
    assert joined_at == [4]


@pytest.mark.parametrize("loop", LOOPS)
def test_cancelled_request_stops_within_a_step_and_the_others_finish(runner: Runner, loop: str) -> None:
    requests = varied_requests(3, num_inference_steps=10)
    alone = run_alone(runner, requests)
    cancel = threading.Event()
    steps_seen: list[int] = []

    def progress(step: int, total: int) -> None:
        steps_seen.append(step)
        if step == 2:
            cancel.set()

    with batching(runner, loop=loop) as batched, ThreadPoolExecutor(max_workers=3) as pool:
        first = pool.submit(batched.run, requests[0])
        victim = pool.submit(batched.run, requests[1], progress, cancel)
        third = pool.submit(batched.run, requests[2])
        with pytest.raises(Cancelled):
            victim.result()
        results = [first.result(), third.result()]
    assert steps_seen == [1, 2]
    assert_close(pixels(results[0]), pixels(alone[0]))
    assert_close(pixels(results[1]), pixels(alone[2]))


def test_a_request_with_bad_inputs_does_not_take_the_batch_down(runner: Runner) -> None:
    good = varied_requests(2)
    # the pipeline refuses it (its scheduler takes no custom sigmas): a list of prompts of another length is
    # refused before it would join the batch now (limits.check_prompt_lists)
    bad = GenerateRequest(prompt=["a", "b"], extra={"sigmas": [1.0, 0.5]}, seed=1, num_inference_steps=6)
    alone = run_alone(runner, good)
    with batching(runner) as batched, ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(batched.run, request) for request in (good[0], bad, good[1])]
        with pytest.raises(InvalidInputs):
            futures[1].result()
        results = [futures[0].result(), futures[2].result()]
    for batched, solo in zip(results, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


def test_straggler_only_delays_by_the_wait_bound(runner: Runner) -> None:
    """In diffusers' loop, a request that is slow between its steps holds the others up by max_wait_s at most."""

    def dawdle(step: int, total: int) -> None:
        time.sleep(1.0)

    with (
        batching(runner, Rendezvous(max_wait_s=0.05), "diffusers") as batched,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        slow = pool.submit(batched.run, GenerateRequest(prompt="a", seed=1, num_inference_steps=3), dawdle)
        started = time.perf_counter()
        fast = pool.submit(batched.run, GenerateRequest(prompt="b", seed=2, num_inference_steps=3))
        fast.result()
        fast_s = time.perf_counter() - started
        slow.result()
    assert fast_s < 2.5  # waiting on the slow one's 3 steps would take 3 s; the wait is bounded per step


# --- the engine: admission and order -------------------------------------------------------------------------


def _engine(runner: Runner, max_batch_size: int) -> BatchingEngine:
    return BatchingEngine(runner, max_batch_size=max_batch_size, max_queue=16)


def _serve(engine: BatchingEngine, requests: list[GenerateRequest], on_done: Callable[[int], None]) -> list:
    async def main() -> list:
        await engine.start()

        async def one(index: int, request: GenerateRequest) -> GenerateResult:
            await asyncio.sleep(0.01 * index)  # arrive in order
            result = await engine.submit(Generation(request))
            on_done(index)
            return result

        try:
            return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            await engine.stop()

    return asyncio.run(main())


class RecordingRunner(Runner):
    """A real runner that notes the order in which requests start running."""

    started: list[str]

    def run(self, request: GenerateRequest, *args: object, **kwargs: object) -> GenerateResult:
        self.started.append(str(request.prompt))
        return super().run(request, *args, **kwargs)  # type: ignore[arg-type]


def test_engine_bounds_the_batch_and_admits_in_order(models_dir: Path) -> None:
    settings = Settings(model_id="builtin/tiny-sd", models_dir=models_dir)
    runner = RecordingRunner(settings, steps=SharedSteps(Rendezvous(max_wait_s=5.0)))
    runner.started = []
    engine = _engine(runner, max_batch_size=2)
    requests = [GenerateRequest(prompt=f"p{i}", seed=i, num_inference_steps=8) for i in range(5)]
    results = _serve(engine, requests, lambda index: None)
    assert len(results) == 5
    rows = runner.steps.rendezvous.stats.rows  # type: ignore[union-attr]
    assert max(rows) == 2 * 2  # two images at a time, CFG doubles the rows: the batch is full, never fuller
    # first come, first served: two at a time, in order of arrival (threads may swap two admitted together)
    started = runner.started
    assert (set(started[:2]), set(started[2:4]), started[4]) == ({"p0", "p1"}, {"p2", "p3"}, "p4")
    alone = run_alone(Runner(settings, store=runner.store), requests)
    for batched, solo in zip(results, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))


def test_eight_concurrent_requests_share_their_forwards(models_dir: Path) -> None:
    """The point of the engine: 8 concurrent requests cost about as many UNet forwards as one.

    Timing ratios are the benchmark's business (bench/cpu_batching.py): on a shared 2-core CPU they vary too much
    for a test. The forwards are what batching changes, and those are counted exactly."""
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir))
    runner.start()
    requests = [GenerateRequest(prompt=f"p{i}", seed=i, num_inference_steps=10) for i in range(8)]
    batcher = Rendezvous(max_wait_s=5.0)
    run_together(runner, requests, batcher)
    assert batcher.stats.forwards <= 2 * 10  # sequentially: 8 x 10
    assert batcher.stats.rows_total == 8 * 10 * 2  # every step of every request ran, CFG rows included


def test_shared_tokenizer_is_safe_across_threads(runner: Runner) -> None:
    """diffusers tokenizes with padding="max_length" and "longest" in turn; threads must not mix them up."""
    model = runner.store.get(GenerateRequest(prompt="x"))
    pipes = [
        model.pipelines.build(
            model.pipelines.resolve("txt2img"), model.pipelines.scheduler("DDIM"), safety_checker=False
        )
        for _ in range(8)
    ]

    def tokenize(index: int) -> bool:
        tokenizer = pipes[index % 8].tokenizer
        if index % 2:
            ids = tokenizer("a red barn " * (index % 5), padding="max_length", max_length=77, truncation=True).input_ids
            return len(ids) == 77
        return len(tokenizer("a red barn", padding="longest").input_ids) < 77

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(tokenize, range(2000)))


@pytest.mark.parametrize("model_id", ["builtin/tiny-sd3", "builtin/tiny-flux"])
def test_transformers_batched(models_dir: Path, model_id: str) -> None:
    """SD3 and Flux run in our loop through the runner (txt2img and img2img in one batch), as they do alone."""
    runner = _runner(models_dir, model_id)
    image = to_base64(encode_image(Image.new("RGB", (64, 64), (40, 120, 200))))
    requests = [
        *varied_requests(2, width=64, height=64),
        # Flux's pipelines default to 128 latents a side, whatever the model: sizes given
        GenerateRequest(prompt="a cat", seed=7, num_inference_steps=6, image=image, strength=0.7, width=64, height=64),
    ]
    alone = run_alone(runner, requests)
    batcher = Rendezvous(max_wait_s=5.0)
    together = run_together(runner, requests, batcher)  # asserts LOOP == "batched" for each
    assert together[2].meta["PIPELINE"].endswith("Img2ImgPipeline")
    alone_forwards = 4 + 6 + 5  # one per step; img2img denoises 5 of its 6 steps at strength 0.7
    # every step of every request ran: SD3 guides with two rows per image, Flux takes guidance as an input
    assert batcher.stats.rows_total == alone_forwards * (2 if model_id.endswith("sd3") else 1)
    assert batcher.stats.forwards < alone_forwards  # several requests' rows in one forward
    for batched, solo in zip(together, alone, strict=True):
        assert_close(pixels(batched), pixels(solo))
