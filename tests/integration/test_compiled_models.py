"""torch.compile on the tiny models (UNets, and the SD3, Flux and PixArt transformers): requests run compiled once
their shape is ready, with the eager result.

The first tests compile with dynamo's "eager" backend (the same kernels, so the images are identical, and a
compile takes seconds). The real inductor, cold, through the compiling process, takes about six minutes of CPU
on two cores (Flux's transformer about two and a half minutes): those tests run with INDUCTOR_TESTS=1 (and on a
GPU), and bench/compile_bench.py measures the same for the UNet.
"""

from __future__ import annotations

import io
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import Rendezvous, SharedSteps
from diffusers_api.denoising.compile_worker import COMPILE_NICENESS, compile_in_subprocess
from diffusers_api.denoising.compiled import CompiledForward, CompileFailed, CompileState, CompileTarget, Inputs
from diffusers_api.denoising.forward import eager_forward
from diffusers_api.denoising.graphs import CudaGraphForward
from diffusers_api.models.builtin import ensure_builtin
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, GenerateResult

# inductor fuses and reorders the float32 arithmetic of a step (reductions in group norm and attention): the
# tiny UNets' compiled outputs measured within 3.2e-6 of the eager ones, at 1 to 16 rows, for outputs up to 1.6
# (bench/results/compile-cpu.jsonl). The bound leaves room for other CPUs' vector widths.
INDUCTOR_ATOL = 2e-5
INDUCTOR_RTOL = 0.0


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def runner(models_dir: Path) -> Runner:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir))
    runner.start()
    return runner


def sharing(runner: Runner, rendezvous: Rendezvous) -> Runner:
    """A runner on `runner`'s models whose UNet calls go through `rendezvous` (diffusers' own loop)."""
    return Runner(runner.settings, store=runner.store, steps=SharedSteps(rendezvous, own_loop=False))


def pixels(result: GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)


def test_requests_run_compiled_once_ready_with_the_eager_result(runner: Runner) -> None:
    request = GenerateRequest(prompt="a red barn", seed=3, num_inference_steps=4)
    eager = sharing(runner, Rendezvous(max_wait_s=5.0)).run(request)
    forward = CompiledForward(CudaGraphForward(), backend="eager")
    compiling = sharing(runner, Rendezvous(forward=forward, max_wait_s=5.0))
    while_compiling = compiling.run(request)
    assert forward.wait(300)
    # the compile may be ready before the request above ends, so some of its steps may already have run compiled
    before = forward.stats.compiled_steps
    compiled = compiling.run(request)
    assert forward.state is CompileState.READY
    # the request's own steps (grad off, CFG rows, the batcher's concatenated inputs) pass dynamo's guards
    assert forward.stats.compiled_steps - before == 4
    assert forward.stats.fallbacks == 0
    np.testing.assert_array_equal(pixels(while_compiling), pixels(eager))
    np.testing.assert_array_equal(pixels(compiled), pixels(eager))


# a tiny diffusion transformer of each family, and what its request needs (Flux's pipelines default to 128 latents a
# side whatever the model; PixArt would denoise at its nearest aspect-ratio bin, 256 px)
DIT_REQUESTS = {
    "builtin/tiny-sd3": {},
    "builtin/tiny-flux": {},
    "builtin/tiny-pixart": {"extra": {"use_resolution_binning": False}},
}


@pytest.mark.parametrize("model_id", list(DIT_REQUESTS))
def test_transformer_requests_run_compiled_once_ready_with_the_eager_result(models_dir: Path, model_id: str) -> None:
    """SD3, Flux and PixArt in our loop: the transformer's steps compile in the background as a UNet's do (its
    added inputs, Flux's position ids and PixArt's mask and micro-conditions included), and run compiled once
    ready, with the eager image."""
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir))
    runner.start()
    request = GenerateRequest(
        prompt="a red barn", seed=3, num_inference_steps=3, width=64, height=64, **DIT_REQUESTS[model_id]
    )
    eager = Runner(runner.settings, store=runner.store, steps=SharedSteps(Rendezvous(max_wait_s=5.0))).run(request)
    forward = CompiledForward(CudaGraphForward(), backend="eager")
    compiling = Runner(
        runner.settings, store=runner.store, steps=SharedSteps(Rendezvous(forward=forward, max_wait_s=5.0))
    )
    while_compiling = compiling.run(request)
    assert forward.wait(300)
    # the compile may be ready before the request above ends, so some of its steps may already have run compiled
    before = forward.stats.compiled_steps
    compiled = compiling.run(request)
    assert compiled.meta["LOOP"] == "batched"
    assert forward.state is CompileState.READY
    assert forward.summary()["shapes"] == {"queued": 0, "ready": 1, "eager": 0}
    # all 3 steps of the request run compiled: its inputs pass the guards
    assert (forward.stats.compiled_steps - before, forward.stats.fallbacks) == (3, 0)
    np.testing.assert_array_equal(pixels(while_compiling), pixels(eager))
    np.testing.assert_array_equal(pixels(compiled), pixels(eager))


def test_the_compiling_process_builds_the_unet_it_is_told_of(models_dir: Path) -> None:
    """The spec carries class, config, precision and inputs (SDXL's added conditioning too) to a new process,
    which builds the UNet and compiles the step; here with dynamo's eager backend, which needs no cache."""
    unet = UNet2DConditionModel.from_pretrained(ensure_builtin("builtin/tiny-sdxl", models_dir) / "unet").eval()
    job = CompileTarget((), weakref.ref(unet), step_inputs(unet, rows=3), grad=False, inference=False)
    report = compile_in_subprocess(unet, job, CompiledForward(backend="eager"))  # raises CompileFailed if it fails
    # at a lower priority than this process (niceness tops out at 19), so the server's steps keep their cores
    assert report["niceness"] == min(19, os.nice(0) + COMPILE_NICENESS)
    with pytest.raises(CompileFailed, match=r"the compiling process failed: .*no-such-backend"):
        compile_in_subprocess(unet, job, CompiledForward(backend="no-such-backend"))


def test_the_compiling_process_builds_the_transformer_it_is_told_of(models_dir: Path) -> None:
    """A transformer travels the same way: Flux's class and config, its added inputs (pooled text, guidance) and
    its position ids, which have no batch axis; with dynamo's eager backend, which needs no cache."""
    model = FluxTransformer2DModel.from_pretrained(ensure_builtin("builtin/tiny-flux", models_dir) / "transformer")
    args, shared = flux_inputs(model.eval(), rows=2)
    job = CompileTarget((), weakref.ref(model), args, grad=False, inference=False, shared=shared)
    report = compile_in_subprocess(model, job, CompiledForward(backend="eager"))  # raises CompileFailed if it fails
    assert report["niceness"] == min(19, os.nice(0) + COMPILE_NICENESS)


def flux_inputs(model: Any, rows: int) -> tuple[Inputs, dict[str, torch.Tensor]]:
    """A Flux step at 16x16 latents (8x8 tokens of 2x2 patches) and 7 text tokens."""
    generator, config = torch.Generator().manual_seed(rows), model.config
    sample = torch.randn(rows, 64, config.in_channels, generator=generator)
    hidden = torch.randn(rows, 7, config.joint_attention_dim, generator=generator)
    added = {
        "pooled_projections": torch.randn(rows, config.pooled_projection_dim, generator=generator),
        "guidance": torch.full((rows,), 3.5),
    }
    image_ids = torch.zeros(8, 8, 3)
    image_ids[..., 1], image_ids[..., 2] = torch.arange(8)[:, None], torch.arange(8)[None, :]
    shared = {"img_ids": image_ids.reshape(64, 3), "txt_ids": torch.zeros(7, 3)}
    return (sample, torch.linspace(0.9, 0.1, rows), hidden, added), shared


@pytest.mark.inductor
@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.environ.get("INDUCTOR_TESTS"), reason="minutes of CPU: set INDUCTOR_TESTS=1")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiles_a_transformer_in_its_own_process_and_matches_the_eager_step(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cold-cache path for Flux's transformer: a compiling process fills the cache, the server loads from it,
    and the compiled step (position ids included) gives the eager one's output."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    model = FluxTransformer2DModel.from_pretrained(ensure_builtin("builtin/tiny-flux", models_dir) / "transformer")
    args, shared = flux_inputs(model.eval(), rows=2)
    forward = CompiledForward(backend="inductor")
    with torch.no_grad():
        eager = eager_forward(model, *args, shared)
        forward(model, *args, shared)
        while not forward.wait(0.5):
            torch.testing.assert_close(forward(model, *args, shared), eager, atol=INDUCTOR_ATOL, rtol=INDUCTOR_RTOL)
        compiled = forward(model, *args, shared)
    assert forward.summary()["subprocesses"] == 1
    assert (forward.stats.compiled_steps, forward.stats.fallbacks) == (1, 0)
    torch.testing.assert_close(compiled, eager, atol=INDUCTOR_ATOL, rtol=INDUCTOR_RTOL)


@pytest.mark.inductor
@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.environ.get("INDUCTOR_TESTS"), reason="minutes of CPU: set INDUCTOR_TESTS=1")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's imports
def test_inductor_compiles_in_its_own_process_and_matches_the_eager_step(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold cache: the server's thread refuses to trace, a compiling process fills the cache (a UNet built
    from the config; SDXL's added conditioning included), the server loads from it; eager steps run meanwhile."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # inherited by the compiling process
    unet = UNet2DConditionModel.from_pretrained(ensure_builtin("builtin/tiny-sdxl", models_dir) / "unet").eval()
    args = step_inputs(unet, rows=2)
    forward = CompiledForward(backend="inductor")
    with torch.no_grad():
        eager = eager_forward(unet, *args)
        forward(unet, *args)
        while not forward.wait(0.5):  # eager steps beside the compile: none may fail
            torch.testing.assert_close(forward(unet, *args), eager, atol=INDUCTOR_ATOL, rtol=INDUCTOR_RTOL)
        compiled = forward(unet, *args)
    assert forward.summary()["subprocesses"] == 1
    assert (forward.stats.compiled_steps, forward.stats.fallbacks) == (1, 0)
    torch.testing.assert_close(compiled, eager, atol=INDUCTOR_ATOL, rtol=INDUCTOR_RTOL)


def step_inputs(unet: Any, rows: int, device: str = "cpu") -> Inputs:
    generator, config = torch.Generator().manual_seed(rows), unet.config
    sample = torch.randn(rows, config.in_channels, 16, 16, generator=generator)
    hidden = torch.randn(rows, 77, config.cross_attention_dim, generator=generator)
    added = None
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(rows, text, generator=generator), "time_ids": torch.rand(rows, 6) * 64}
    timesteps = torch.linspace(900, 100, rows)
    moved = {name: value.to(device) for name, value in (added or {}).items()} or None
    return sample.to(device), timesteps.to(device), hidden.to(device), moved


@pytest.mark.gpu
@pytest.mark.inductor
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_capture_the_compiled_unet(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the bucket's graph is captured again from the compiled UNet once it is ready, and replays it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    unet = UNet2DConditionModel.from_pretrained(ensure_builtin("builtin/tiny-sd", models_dir) / "unet")
    unet = unet.to("cuda").eval()
    args = step_inputs(unet, rows=3, device="cuda")
    graphs = CudaGraphForward()
    forward = CompiledForward(graphs, backend="inductor")
    with torch.no_grad():
        eager = forward(unet, *args)  # the eager graph of bucket 4; the compile for 4 rows is queued
        assert graphs.captures == 1
        assert forward.wait(600)
        compiled = forward(unet, *args)  # captures the compiled UNet's graph for bucket 4
        replayed = forward(unet, *args)
    assert graphs.captures == 2
    assert (forward.stats.compiled_steps, forward.stats.fallbacks) == (2, 0)
    torch.testing.assert_close(replayed, compiled, rtol=0, atol=0)
    # cuDNN's TF32 convolutions and inductor's fused kernels round differently (as in test_graphs.py)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=5e-3)


@pytest.mark.gpu
@pytest.mark.inductor
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_capture_the_compiled_transformer(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for the UNet: Flux's bucket graph is captured again from the compiled transformer (its position ids, which
    are not padded, copied in at each replay) and replays it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    model = FluxTransformer2DModel.from_pretrained(ensure_builtin("builtin/tiny-flux", models_dir) / "transformer")
    model = model.to("cuda").eval()
    (sample, timesteps, hidden, added), shared = flux_inputs(model, rows=3)
    args = (sample.cuda(), timesteps.cuda(), hidden.cuda(), {name: value.cuda() for name, value in added.items()})
    ids = {name: value.cuda() for name, value in shared.items()}
    graphs = CudaGraphForward()
    forward = CompiledForward(graphs, backend="inductor")
    with torch.no_grad():
        eager = forward(model, *args, ids)  # the eager graph of bucket 4; the compile for 4 rows is queued
        assert graphs.captures == 1
        assert forward.wait(600)
        compiled = forward(model, *args, ids)
        replayed = forward(model, *args, ids)
    assert graphs.captures == 2
    assert (forward.stats.compiled_steps, forward.stats.fallbacks) == (2, 0)
    torch.testing.assert_close(replayed, compiled, rtol=0, atol=0)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=5e-3)
