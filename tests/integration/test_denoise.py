"""Our own denoising loop against diffusers' on the tiny models: the same latents, alone and batched.

Alone, a request in our loop runs the very same operations as the pipeline's call, so its latents are equal
bit for bit. Batched, only the UNet's batch differs; batched and unbatched kernels round differently in the last
bits, and the bound asserted for that is BATCHED_RTOL of the latents' largest magnitude (a few float32 ulps;
measured: at most 4e-7).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import Denoiser, Rendezvous
from diffusers_api.denoising import tasks as denoise
from diffusers_api.denoising.tasks import DenoiseTask
from diffusers_api.errors import Cancelled, NotReady
from diffusers_api.models.store import LoadedModel, ModelStore
from diffusers_api.pipelines import SCHEDULER_ALIASES
from diffusers_api.schema import GenerateRequest

BATCHED_RTOL = 1e-5
SD_SCHEDULERS = [name for name in SCHEDULER_ALIASES if name != "LCM"]  # LCM needs an LCM-distilled model


def _model(models_dir: Path, model_id: str) -> LoadedModel:
    store = ModelStore(Settings(model_id=model_id, models_dir=models_dir))
    store.load_default()
    return store.get(GenerateRequest(prompt="x"))


@pytest.fixture(scope="module")
def sd(models_dir: Path) -> LoadedModel:
    return _model(models_dir, "builtin/tiny-sd")


@pytest.fixture(scope="module")
def sdxl(models_dir: Path) -> LoadedModel:
    return _model(models_dir, "builtin/tiny-sdxl")


@pytest.fixture
def denoiser() -> Iterator[Denoiser]:
    loop = Denoiser(Rendezvous(max_wait_s=5.0))
    yield loop
    loop.stop()


def pipe(model: LoadedModel, task: str = "txt2img", scheduler: str | None = None) -> Any:
    pipelines = model.pipelines
    chosen = (
        pipelines.scheduler(scheduler) if scheduler else pipelines.scheduler(type(pipelines.base.scheduler).__name__)
    )
    return pipelines.build(pipelines.resolve(task), chosen, safety_checker=False)


def call(seed: int, images: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Pipeline arguments; fresh generators every time (they carry state)."""
    defaults = {"prompt": f"a red barn {seed}", "num_inference_steps": 4}
    generators = [torch.Generator().manual_seed(seed + i) for i in range(images)]
    return defaults | {"num_images_per_prompt": images, "generator": generators} | kwargs


def reference(model: LoadedModel, task: str, scheduler: str | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """diffusers' own call, stopped before the VAE."""
    latents: torch.Tensor = pipe(model, task, scheduler)(**kwargs, output_type="latent").images
    return latents


def ours(model: LoadedModel, task: str, scheduler: str | None, kwargs: dict[str, Any]) -> DenoiseTask:
    job = denoise.prepare(pipe(model, task, scheduler), kwargs)
    return job


def run_all(denoiser: Denoiser, jobs: list[DenoiseTask]) -> None:
    """Submit every job at once (they share rounds) and wait for all. Until every job is in, the loop is held at
    the rendezvous (it takes the rendezvous' lock to join a round), so that on a busy machine the first job cannot
    finish all its steps before the last thread gets to submit."""
    threads = [threading.Thread(target=denoiser.run, args=(job,)) for job in jobs]
    submitted = denoiser.stats.jobs
    with denoiser.rendezvous._cond:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while denoiser.stats.jobs < submitted + len(jobs) and time.monotonic() < deadline:
            time.sleep(0.005)
    for thread in threads:
        thread.join(120)


def assert_batched_close(batched: torch.Tensor, expected: torch.Tensor) -> None:
    bound = BATCHED_RTOL * float(expected.abs().max())
    assert float((batched - expected).abs().max()) <= bound


def red_image() -> Image.Image:
    return Image.new("RGB", (64, 64), (180, 40, 40))


# --- equal to diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", SD_SCHEDULERS)
def test_batched_latents_equal_diffusers_within_rounding(sd: LoadedModel, denoiser: Denoiser, scheduler: str) -> None:
    def kwargs() -> list[dict[str, Any]]:  # guided, unguided, guided with its own scale and negative prompt
        return [call(1), call(2, guidance_scale=1.0), call(3, guidance_scale=3.0, negative_prompt="blurry")]

    expected = [reference(sd, "txt2img", scheduler, k) for k in kwargs()]
    jobs = [ours(sd, "txt2img", scheduler, k) for k in kwargs()]
    run_all(denoiser, jobs)
    assert denoiser.stats.max_jobs == 3  # they really stepped together
    for job, want in zip(jobs, expected, strict=True):
        assert job.error is None
        assert_batched_close(job.latents, want)


@pytest.mark.parametrize("scheduler", ["DPM++ 2M", "Euler a", "Heun", "DDIM"])
def test_alone_latents_equal_diffusers_exactly(sd: LoadedModel, denoiser: Denoiser, scheduler: str) -> None:
    expected = reference(sd, "txt2img", scheduler, call(1, negative_prompt="blurry"))
    job = ours(sd, "txt2img", scheduler, call(1, negative_prompt="blurry"))
    denoiser.run(job)
    assert torch.equal(job.latents, expected)


def test_several_images_eta_and_guidance_rescale(sd: LoadedModel, denoiser: Denoiser) -> None:
    """DDIM with eta draws noise from each image's generator; guidance_rescale needs the conditional half."""

    def kwargs() -> list[dict[str, Any]]:
        return [call(4, images=2, eta=0.5), call(6, guidance_rescale=0.7, guidance_scale=9.0)]

    expected = [reference(sd, "txt2img", "DDIM", k) for k in kwargs()]
    jobs = [ours(sd, "txt2img", "DDIM", k) for k in kwargs()]
    run_all(denoiser, jobs)
    for job, want in zip(jobs, expected, strict=True):
        assert job.latents.shape == want.shape
        assert_batched_close(job.latents, want)


def test_img2img_equals_diffusers(sd: LoadedModel, denoiser: Denoiser) -> None:
    expected = reference(sd, "img2img", "Euler a", call(7, image=red_image(), strength=0.6))
    job = ours(sd, "img2img", "Euler a", call(7, image=red_image(), strength=0.6))
    assert job.steps == 2  # strength 0.6 of 4 steps, as diffusers counts them
    denoiser.run(job)
    assert torch.equal(job.latents, expected)


def sdxl_calls() -> list[tuple[str, dict[str, Any]]]:
    """SDXL txt2img with its micro-conditioning (negative sizes too), and img2img with an aesthetic score."""
    sizes = {"original_size": (128, 128), "negative_original_size": (32, 32), "negative_target_size": (64, 64)}
    return [("txt2img", call(8, **sizes)), ("img2img", call(9, image=red_image(), strength=0.7, aesthetic_score=7.0))]


def half_masked() -> dict[str, Image.Image]:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    return {"image": red_image(), "mask_image": mask}


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize(
    ("models", "extra"),
    [
        (("builtin/tiny-sd-inpaint", "builtin/tiny-sd"), {}),
        (("builtin/tiny-sdxl-inpaint", "builtin/tiny-sdxl"), {"aesthetic_score": 7.0, "original_size": (96, 96)}),
    ],
    ids=["sd", "sdxl"],
)
def test_inpaint_equals_diffusers(
    models_dir: Path, denoiser: Denoiser, models: tuple[str, str], extra: dict[str, Any], strength: float
) -> None:
    """Both kinds of inpainting: a 9-channel inpainting UNet, and the plain 4-channel one the pipeline blends."""
    for model in (_model(models_dir, model_id) for model_id in models):
        assert denoise.supports(pipe(model, "inpaint"), call(1, strength=strength, **half_masked(), **extra))
        expected = [
            reference(model, "inpaint", "DPM++ 2M", call(s, strength=strength, **half_masked(), **extra))
            for s in (1, 2)
        ]
        alone = ours(model, "inpaint", "DPM++ 2M", call(1, strength=strength, **half_masked(), **extra))
        denoiser.run(alone)
        assert torch.equal(alone.latents, expected[0])
        jobs = [
            ours(model, "inpaint", "DPM++ 2M", call(s, strength=strength, **half_masked(), **extra)) for s in (1, 2)
        ]
        run_all(denoiser, jobs)
        for job, want in zip(jobs, expected, strict=True):
            assert_batched_close(job.latents, want)


@pytest.mark.parametrize("scheduler", [None, "DPM++ 2M", "Euler a"])
def test_sdxl_txt2img_and_img2img_equal_diffusers(sdxl: LoadedModel, denoiser: Denoiser, scheduler: str | None) -> None:
    expected = [reference(sdxl, task, scheduler, kwargs) for task, kwargs in sdxl_calls()]
    alone = [ours(sdxl, task, scheduler, kwargs) for task, kwargs in sdxl_calls()]
    for job, want in zip(alone, expected, strict=True):
        denoiser.run(job)
        assert torch.equal(job.latents, want)
    together = [ours(sdxl, task, scheduler, kwargs) for task, kwargs in sdxl_calls()]
    run_all(denoiser, together)
    for job, want in zip(together, expected, strict=True):
        assert_batched_close(job.latents, want)


def test_finish_gives_the_pipelines_images(
    models_dir: Path, sd: LoadedModel, sdxl: LoadedModel, denoiser: Denoiser
) -> None:
    import numpy as np

    sdxl_inpaint = _model(models_dir, "builtin/tiny-sdxl-inpaint")
    for model, task, kwargs in [
        (sd, "txt2img", {}),
        (sdxl, "txt2img", {}),
        (sdxl_inpaint, "inpaint", half_masked()),
    ]:
        expected = pipe(model, task)(**call(10, **kwargs), output_type="pil").images[0]
        job = ours(model, task, None, call(10, **kwargs))
        denoiser.run(job)
        image = denoise.finish(pipe(model, task), job, call(10, **kwargs)).images[0]
        assert np.array_equal(np.asarray(image), np.asarray(expected))


# --- which requests the loop takes ------------------------------------------------------------------------------


def test_supports_only_what_it_reproduces(sd: LoadedModel, models_dir: Path) -> None:
    txt2img = pipe(sd)
    assert denoise.supports(txt2img, call(1))
    assert denoise.supports(pipe(sd, "img2img"), call(1, image=red_image(), strength=0.5))
    assert not denoise.supports(txt2img, call(1, output_type="latent"))
    assert not denoise.supports(txt2img, call(1, timesteps=[999, 500]))
    assert not denoise.supports(txt2img, call(1, cross_attention_kwargs={"scale": 0.5}))
    inpaint = _model(models_dir, "builtin/tiny-sd-inpaint")
    assert denoise.supports(pipe(inpaint, "inpaint"), call(1, image=red_image(), mask_image=red_image()))
    assert not denoise.supports(pipe(inpaint, "inpaint"), call(1, image=red_image(), padding_mask_crop=8))
    community = type("MyCommunityPipeline", (type(txt2img),), {})  # a subclass may change what __call__ does
    assert not denoise.supports(object.__new__(community), call(1))


# --- failures stay with their request ----------------------------------------------------------------------------


def test_a_failing_scheduler_step_fails_only_its_request(sd: LoadedModel, denoiser: Denoiser) -> None:
    expected = [reference(sd, "txt2img", None, call(s)) for s in (11, 13)]
    jobs = [ours(sd, "txt2img", None, call(s)) for s in (11, 12, 13)]
    original = jobs[1].scheduler.step

    def broken(*args: Any, **kwargs: Any) -> Any:
        if jobs[1].step == 2:
            raise RuntimeError("scheduler exploded")
        return original(*args, **kwargs)

    jobs[1].scheduler.step = broken
    errors: list[BaseException] = []

    def run(job: DenoiseTask) -> None:
        try:
            denoiser.run(job)
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [str(e) for e in errors] == ["scheduler exploded"]
    for job, want in zip([jobs[0], jobs[2]], expected, strict=True):
        assert job.finished
        assert_batched_close(job.latents, want)


def test_a_failing_batched_forward_is_retried_request_by_request(sd: LoadedModel) -> None:
    """A batched forward that fails for another reason than memory: each request then runs alone."""
    from diffusers_api.denoising.forward import eager_forward

    def small_batches_only(unet: Any, sample: torch.Tensor, *args: Any) -> Any:
        if sample.shape[0] > 2:
            raise RuntimeError("no kernel for this batch (simulated)")
        return eager_forward(unet, sample, *args)

    batcher = Rendezvous(forward=small_batches_only)
    loop = Denoiser(batcher)
    expected = [reference(sd, "txt2img", None, call(s)) for s in (14, 15)]
    jobs = [ours(sd, "txt2img", None, call(s)) for s in (14, 15)]
    try:
        run_all(loop, jobs)
    finally:
        loop.stop()
    assert max(batcher.stats.rows) == 2
    for job, want in zip(jobs, expected, strict=True):
        assert job.error is None
        assert torch.equal(job.latents, want)  # each ran alone: exactly diffusers' result


def test_a_batch_too_big_for_memory_is_split_and_capped_until_idle(sd: LoadedModel) -> None:
    from diffusers_api.denoising.forward import eager_forward

    attempts: list[int] = []

    def four_rows_fit(unet: Any, sample: torch.Tensor, *args: Any) -> Any:
        attempts.append(int(sample.shape[0]))
        if sample.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return eager_forward(unet, sample, *args)

    batcher = Rendezvous(forward=four_rows_fit)
    loop = Denoiser(batcher)
    seeds = (20, 21, 22, 23)
    expected = [reference(sd, "txt2img", None, call(s, num_inference_steps=6)) for s in seeds]
    try:
        for burst in (1, 2):
            jobs = [ours(sd, "txt2img", None, call(s, num_inference_steps=6)) for s in seeds]
            run_all(loop, jobs)
            for job, want in zip(jobs, expected, strict=True):
                assert job.error is None
                assert_batched_close(job.latents, want)
            # one failed attempt per burst: after it, the group's forwards stay under the cap
            assert loop.stats.out_of_memory == burst
            assert sum(rows > 4 for rows in attempts) == burst
            assert max(batcher.stats.rows) <= 4
            assert wait_until(lambda: loop.stats.row_cap is None)  # idle: the cap is forgotten
    finally:
        loop.stop()


def test_the_split_retry_runs_once_the_failed_forward_is_freed(sd: LoadedModel) -> None:
    """Retrying inside the except block would keep the failed forward's tensors (its traceback holds them)
    alive through the retry, which then runs out of memory again."""
    from diffusers_api.denoising.forward import eager_forward

    failed: list[weakref.ref[torch.Tensor]] = []
    held_at_retry: list[bool] = []

    def forward(unet: Any, sample: torch.Tensor, *args: Any) -> Any:
        if failed:
            held_at_retry.append(any(ref() is not None for ref in failed))
        if sample.shape[0] > 2:
            activations = torch.empty(1 << 20)  # what a real forward holds when it runs out of memory
            failed.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return eager_forward(unet, sample, *args)

    loop = Denoiser(Rendezvous(forward=forward))
    jobs = [ours(sd, "txt2img", None, call(s, num_inference_steps=3)) for s in (30, 31)]
    try:
        run_all(loop, jobs)
    finally:
        loop.stop()
    assert all(job.error is None for job in jobs)
    assert failed  # the two did meet in one forward, and it failed
    assert held_at_retry
    assert not any(held_at_retry)


def wait_until(condition: Any, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_cancel_stops_at_the_next_step_boundary(sd: LoadedModel, denoiser: Denoiser) -> None:
    job = ours(sd, "txt2img", None, call(16, num_inference_steps=8))
    job.cancel = threading.Event()
    steps: list[int] = []

    def progress(step: int, total: int) -> None:
        steps.append(step)
        if step == 4:
            job.cancel.set()  # type: ignore[union-attr]

    job.progress = progress
    with pytest.raises(Cancelled, match="after step 4"):
        denoiser.run(job)
    assert steps == [1, 2, 3, 4]
    assert denoiser.active == 0


def test_stop_fails_waiting_requests_instead_of_hanging(sd: LoadedModel) -> None:
    loop = Denoiser(Rendezvous())
    loop.stop()
    with pytest.raises(NotReady):
        loop.run(ours(sd, "txt2img", None, call(17)))


def test_a_failed_round_leaves_the_rendezvous(sd: LoadedModel) -> None:
    """After a round fails outright, the idle loop must not stay a participant that others wait for."""
    batcher = Rendezvous()
    loop = Denoiser(batcher)
    job = ours(sd, "txt2img", None, call(18))
    job.key = lambda: (_ for _ in ()).throw(RuntimeError("grouping exploded"))  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="grouping exploded"):
            loop.run(job)
        assert batcher.participants == 0
    finally:
        loop.stop()


# --- host work per request ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["builtin/tiny-sd", "builtin/tiny-sdxl"])
def test_the_execution_device_is_read_once_per_model(
    models_dir: Path, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diffusers finds it by walking every submodule of every component (8.4 ms for SD2.1 here, with the GIL
    held); requests of one model reuse what the first one found."""
    from diffusers import DiffusionPipeline

    model = _model(models_dir, model_id)  # a model of its own: no earlier test has read its device
    reads: list[Any] = []
    found = DiffusionPipeline._execution_device

    def counted(self: Any) -> Any:
        reads.append(self)
        return found.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(counted))
    for seed in range(3):
        request_pipe = pipe(model)
        job = denoise.prepare(request_pipe, call(seed))
        output = denoise.finish(request_pipe, job, {})
        assert len(output.images) == 1
    assert len(reads) == 1


@pytest.mark.parametrize("scheduler", ["DPM++ 2M", "Euler a", "UniPCMultistepScheduler"])
def test_the_loop_never_looks_up_a_first_step_index(
    sd: LoadedModel, denoiser: Denoiser, scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking it up reads a device tensor (a sync on a GPU); the request's own thread does it while preparing."""
    request_pipe = pipe(sd, "txt2img", scheduler)
    threads: list[str] = []
    lookup = type(request_pipe.scheduler).index_for_timestep

    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return lookup(self, *args, **kwargs)

    monkeypatch.setattr(type(request_pipe.scheduler), "index_for_timestep", recorded)
    kwargs = call(7)
    job = denoise.prepare(request_pipe, kwargs)
    run_all(denoiser, [job])
    assert job.error is None
    assert threads == [threading.current_thread().name]  # once, while preparing
    assert torch.equal(job.latents, reference(sd, "txt2img", scheduler, call(7)))  # and the same steps


# --- diffusion transformers: SD3 and Flux -------------------------------------------------------------------------

DIT_MODELS = ["builtin/tiny-sd3", "builtin/tiny-flux", "flux-schnell"]


@pytest.fixture(scope="module")
def dit_models(models_dir: Path) -> dict[str, LoadedModel]:
    """The tiny SD3 and Flux (dev: guidance-distilled), and a schnell-like Flux: no guidance input."""
    models = {model_id: _model(models_dir, model_id) for model_id in DIT_MODELS[:2]}
    schnell = _model(models_dir, "builtin/tiny-flux")  # a model of its own: its transformer is replaced
    config = dict(schnell.pipelines.base.transformer.config) | {"guidance_embeds": False}
    transformer = type(schnell.pipelines.base.transformer).from_config(config).eval()
    schnell.pipelines.components["transformer"] = transformer
    return models | {"flux-schnell": schnell}


def dit_calls() -> list[tuple[str, dict[str, Any]]]:
    """txt2img with the default guidance, txt2img with its own (unguided for SD3), img2img: sizes given, since
    Flux's pipeline defaults to 128 latents a side whatever the model."""
    size = {"height": 64, "width": 64}
    return [
        ("txt2img", call(40, **size)),
        ("txt2img", call(41, guidance_scale=1.0, negative_prompt="blurry", **size)),
        ("img2img", call(42, image=red_image(), strength=0.7, **size)),
    ]


@pytest.mark.parametrize("model_id", DIT_MODELS)
def test_transformers_equal_diffusers_alone_and_batched(
    dit_models: dict[str, LoadedModel], denoiser: Denoiser, model_id: str
) -> None:
    model = dit_models[model_id]
    expected = [reference(model, task, None, kwargs) for task, kwargs in dit_calls()]
    for (task, kwargs), want in zip(dit_calls(), expected, strict=True):
        assert denoise.supports(pipe(model, task), kwargs)
        alone = ours(model, task, None, kwargs)
        denoiser.run(alone)
        assert torch.equal(alone.latents, want)
    together = [ours(model, task, None, kwargs) for task, kwargs in dit_calls()]
    run_all(denoiser, together)
    assert denoiser.stats.max_jobs == 3
    # one forward for all three: SD3 guides the first and the last (two rows each); Flux takes one row per image
    assert max(denoiser.rendezvous.stats.rows) == (5 if model_id == "builtin/tiny-sd3" else 3)
    for job, want in zip(together, expected, strict=True):
        assert job.error is None
        assert_batched_close(job.latents, want)


def test_flux_rows_of_other_grids_never_share_a_forward(dit_models: dict[str, LoadedModel], denoiser: Denoiser) -> None:
    """64x128 and 128x64 pack into as many tokens of the same shape, but their position ids differ."""
    model = dit_models["builtin/tiny-flux"]

    def kwargs() -> list[dict[str, Any]]:
        return [call(50, height=64, width=128), call(51, height=128, width=64)]

    expected = [reference(model, "txt2img", None, k) for k in kwargs()]
    jobs = [ours(model, "txt2img", None, k) for k in kwargs()]
    assert jobs[0].latents.shape == jobs[1].latents.shape
    run_all(denoiser, jobs)
    assert denoiser.stats.max_jobs == 2
    assert max(denoiser.rendezvous.stats.rows) == 1
    for job, want in zip(jobs, expected, strict=True):
        assert torch.equal(job.latents, want)


@pytest.mark.parametrize("model_id", DIT_MODELS[:2])
def test_transformers_finish_gives_the_pipelines_images(
    dit_models: dict[str, LoadedModel], denoiser: Denoiser, model_id: str
) -> None:
    import numpy as np

    model = dit_models[model_id]
    expected = pipe(model)(**call(52, height=64, width=96), output_type="pil").images[0]
    job = ours(model, "txt2img", None, call(52, height=64, width=96))
    denoiser.run(job)
    image = denoise.finish(pipe(model), job, {}).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_transformers_support_only_what_the_loop_reproduces(dit_models: dict[str, LoadedModel]) -> None:
    sd3, flux = (pipe(dit_models[model_id]) for model_id in DIT_MODELS[:2])
    assert denoise.supports(sd3, call(1, prompt_3="a barn", negative_prompt_3="fog", max_sequence_length=64))
    assert not denoise.supports(sd3, call(1, skip_guidance_layers=[1]))  # a third forward per step
    assert not denoise.supports(sd3, call(1, output_type="latent"))
    assert denoise.supports(flux, call(1, negative_prompt="fog"))  # without true CFG Flux ignores it
    assert denoise.supports(flux, call(1, true_cfg_scale=4.0))  # and without a negative prompt, true CFG is off
    assert not denoise.supports(flux, call(1, negative_prompt="fog", true_cfg_scale=4.0))
    assert not denoise.supports(flux, call(1, sigmas=[1.0, 0.5]))
