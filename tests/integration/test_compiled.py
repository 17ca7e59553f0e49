"""torch.compile on the tiny models: requests run compiled once their shape is ready, with the eager result.

The first test compiles with dynamo's "eager" backend (the same kernels, so the images are identical, and a
compile takes seconds). The second runs the real inductor once (about a minute and a half on two cores;
`-m "not inductor"` skips it) and bounds how far its kernels round from the eager ones.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.engine import StepBatcher
from diffusers_api.engine.batcher import eager_forward
from diffusers_api.engine.compiled import CompiledForward, CompileState
from diffusers_api.engine.graphs import CudaGraphForward
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, GenerateResult

# inductor fuses and reorders the float32 arithmetic of a step (reductions in group norm and attention):
# the tiny UNet's compiled output stays within this of the eager one (measured: see bench/compile_bench.py)
INDUCTOR_ATOL = 1e-4
INDUCTOR_RTOL = 1e-4


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


def pixels(result: GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)


def test_requests_run_compiled_once_ready_with_the_eager_result(runner: Runner) -> None:
    request = GenerateRequest(prompt="a red barn", seed=3, num_inference_steps=4)
    runner.batcher = StepBatcher(max_wait_s=5.0)
    try:
        eager = runner.run(request)
        forward = CompiledForward(CudaGraphForward(), backend="eager")
        runner.batcher = StepBatcher(forward=forward, max_wait_s=5.0)
        while_compiling = runner.run(request)
        assert forward.wait(300)
        compiled = runner.run(request)
    finally:
        runner.batcher = None
    assert forward.state is CompileState.READY
    # the request's own steps (grad off, CFG rows, the batcher's concatenated inputs) pass dynamo's guards
    assert forward.stats.compiled_steps == 4
    assert forward.stats.fallbacks == 0
    np.testing.assert_array_equal(pixels(while_compiling), pixels(eager))
    np.testing.assert_array_equal(pixels(compiled), pixels(eager))


@pytest.mark.inductor
def test_inductor_step_matches_the_eager_step(
    runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    unet = runner.store.get(GenerateRequest(prompt="x")).pipelines.base.unet
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    hidden = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    args = (sample, torch.tensor([999.0, 999.0]), hidden, None)
    forward = CompiledForward(backend="inductor")
    with torch.no_grad():
        forward(unet, *args)
        assert forward.wait(600)
        compiled = forward(unet, *args)
        eager = eager_forward(unet, *args)
    assert forward.stats.compiled_steps == 1
    assert forward.stats.fallbacks == 0
    torch.testing.assert_close(compiled, eager, atol=INDUCTOR_ATOL, rtol=INDUCTOR_RTOL)
