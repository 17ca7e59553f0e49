"""CompiledForward over a toy UNet and a toy diffusion transformer with fast dynamo backends: compiling never blocks a
step, the eager path serves until a shape is compiled, a cold cache is filled elsewhere instead of tracing in the
server, failures stay eager, evicted models are freed. The real inductor and the compiling process run in
tests/integration/test_compiled_models.py and bench/compile_bench.py."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from diffusers_api.config import Settings
from diffusers_api.denoising import Rendezvous, SharedSteps
from diffusers_api.denoising.compiled import (
    ColdCache,
    CompiledForward,
    CompileFailed,
    CompileState,
    CompileTarget,
    _module_rows,
    _no_tracing_here,
)
from diffusers_api.denoising.forward import eager_forward
from diffusers_api.denoising.graphs import CudaGraphForward
from diffusers_api.engine import make_engine
from diffusers_api.http.app import create_app
from support.fakes import FakeEngine


class ToyUNet(torch.nn.Module):
    """A UNet's call signature over one convolution and one projection: dynamo traces it in well under a second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor]:
        context = self.proj(encoder_hidden_states).mean(dim=1)[:, :, None, None]
        noise = self.conv(sample) + context + timestep[:, None, None, None] / 1000
        if added_cond_kwargs:
            noise = noise + added_cond_kwargs["text_embeds"].mean(dim=1)[:, None, None, None]
        return (noise,)


class ToyTransformer(ToyUNet):
    """The same arithmetic called as a diffusion transformer is (SD3, Flux, PixArt: the latents as `hidden_states`,
    every input by name; `text_embeds` stands for SD3's `pooled_projections`)."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor]:
        assert timestep is not None
        assert encoder_hidden_states is not None
        added = {"text_embeds": text_embeds} if text_embeds is not None else None
        return super().forward(hidden_states, timestep, encoder_hidden_states, added)


class ToyFlux(torch.nn.Module):
    """Flux's inputs: pooled text and guidance per row, position ids for image and text tokens without a batch axis
    (the forward's shared inputs); the latents are tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)
        self.pooled = torch.nn.Linear(6, 4)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor]:
        for given in (encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
            assert given is not None
        text = self.proj(encoder_hidden_states).mean(dim=1) + self.pooled(pooled_projections)
        positions = img_ids.sum(dim=1)[None, :, None] + txt_ids.sum()
        scale = (timestep * guidance)[:, None, None]
        return (hidden_states * scale + text[:, None, :] + positions,)


class ToyPixArt(ToyTransformer):
    """PixArt's call: an attention mask per row, and micro-conditions (`added_cond_kwargs`) the loop gives as None."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor]:
        assert added_cond_kwargs == {"resolution": None, "aspect_ratio": None}
        assert encoder_attention_mask is not None
        masked = encoder_hidden_states * encoder_attention_mask[:, :, None]
        return super().forward(hidden_states, timestep, masked)


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]


def inputs(rows: int, size: int = 8, added: bool = False) -> Inputs:
    generator = torch.Generator().manual_seed(rows * 100 + size)
    sample = torch.randn(rows, 4, size, size, generator=generator)
    hidden = torch.randn(rows, 5, 8, generator=generator)
    extra = {"text_embeds": torch.randn(rows, 6, generator=generator)} if added else None
    return sample, torch.linspace(900, 100, rows), hidden, extra


class SlowBackend:
    """Compiles (to the graph itself) only when released: a compile that takes as long as the test wants."""

    def __init__(self) -> None:
        self.started, self.release, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, graph: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        self.calls += 1
        self.started.set()
        assert self.release.wait(30)
        return graph.forward


class FailingBackend:
    """A compile that raises, as inductor does without a working C++ compiler or Triton."""

    calls = 0

    def __call__(self, graph: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        self.calls += 1
        raise RuntimeError("no working C++ compiler")


class BrokenAtRunBackend:
    """Compiles fine; the compiled graph raises `error` while it is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def __call__(self, graph: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            if self.error is not None:
                raise self.error
            return graph.forward(*args)

        return run


class ColdCacheBackend:
    """FX-traces the graph, as inductor does on a cache miss, until `fill` has run (standing in for the
    compiling process); then it "loads" (returns the graph)."""

    def __init__(self, fills_cache: bool = True) -> None:
        self.fills_cache, self.filled, self.fills = fills_cache, False, 0

    def __call__(self, graph: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        if not self.filled:
            torch.fx.symbolic_trace(graph)
        return graph.forward

    def fill(self, unet: Any, job: CompileTarget, forward: CompiledForward) -> None:
        self.fills += 1
        self.filled = self.fills_cache


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Compiled code lives on the compiled function's code object: each test starts without any."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=[ToyUNet, ToyTransformer], ids=["unet", "transformer"])
def unet(request: pytest.FixtureRequest) -> ToyUNet:
    """The tests' model: a UNet, and a diffusion transformer that compiles through the same paths."""
    model: ToyUNet = request.param().eval()
    return model


def kind(model: torch.nn.Module) -> str:
    return "transformer" if isinstance(model, ToyTransformer) else "UNet"


def step(forward: Callable[..., Any], unet: torch.nn.Module, args: Inputs) -> torch.Tensor:
    with torch.no_grad():  # as in diffusers' pipelines
        result: torch.Tensor = forward(unet, *args)
        return result


def test_steps_run_eagerly_while_compiling_then_compiled(unet: ToyUNet) -> None:
    backend = SlowBackend()
    forward = CompiledForward(backend=backend)
    assert forward.state is CompileState.WAITING
    for _ in range(3):  # the compile is blocked, yet every step returns: it is not on the request path
        args = inputs(2)
        torch.testing.assert_close(step(forward, unet, args), step(eager_forward, unet, args), rtol=0, atol=0)
    assert backend.started.wait(30)
    assert forward.state is CompileState.COMPILING
    assert (forward.stats.eager_steps, forward.stats.compiled_steps) == (3, 0)
    backend.release.set()
    assert forward.wait(30)
    assert forward.state is CompileState.READY
    args = inputs(2)
    torch.testing.assert_close(step(forward, unet, args), step(eager_forward, unet, args), rtol=0, atol=0)
    assert (forward.stats.compiled_steps, forward.stats.fallbacks, forward.stats.graphs) == (1, 0, 1)


@pytest.mark.parametrize("added", [False, True], ids=["sd", "sdxl-added-cond"])
def test_one_compile_serves_every_batch_size(unet: ToyUNet, added: bool) -> None:
    """The batch dimension is compiled dynamic: new batch sizes reuse the graph (one batch of 1 is special)."""
    forward = CompiledForward(backend="eager")
    step(forward, unet, inputs(2, added=added))
    assert forward.wait(30)
    for rows in (3, 5, 8, 2, 1):
        step(forward, unet, inputs(rows, added=added))  # each new shape: eager once, checked in the background
    assert forward.wait(30)
    for rows in (3, 5, 8, 2, 1):
        args = inputs(rows, added=added)
        torch.testing.assert_close(step(forward, unet, args), step(eager_forward, unet, args), rtol=0, atol=0)
    summary = forward.summary()
    assert summary["shapes"] == {"queued": 0, "ready": 5, "eager": 0}
    assert summary["graphs"] == 2  # rows >= 2 (dynamic) and rows == 1
    assert summary["compiled_steps"] == 6  # rows 2 was ready for the second round already
    assert summary["fallbacks"] == 0


def test_a_failed_compile_warns_and_stays_eager_for_good(unet: ToyUNet, caplog: pytest.LogCaptureFixture) -> None:
    backend = FailingBackend()
    forward = CompiledForward(backend=backend)
    with caplog.at_level(logging.WARNING, logger="diffusers_api.denoising.compiled"):
        step(forward, unet, inputs(2))
        assert forward.wait(30)
    assert "torch.compile failed (RuntimeError: no working C++ compiler)" in caplog.text
    assert forward.state is CompileState.FAILED
    assert forward.summary()["error"] == "RuntimeError: no working C++ compiler"
    for rows, size in ((2, 8), (3, 12)):  # new shapes are not even tried
        args = inputs(rows, size)
        torch.testing.assert_close(step(forward, unet, args), step(eager_forward, unet, args), rtol=0, atol=0)
    assert forward.wait(30)
    assert backend.calls == 1
    assert forward.stats.eager_steps == 3
    assert forward.summary()["shapes"] == {"queued": 0, "ready": 0, "eager": 2}


def test_a_shape_dynamo_will_not_compile_stays_eager(unet: ToyUNet, caplog: pytest.LogCaptureFixture) -> None:
    forward = CompiledForward(backend="eager", recompile_limit=1)
    step(forward, unet, inputs(2, size=8))
    assert forward.wait(30)
    with caplog.at_level(logging.WARNING, logger="diffusers_api.denoising.compiled"):
        step(forward, unet, inputs(2, size=12))  # another resolution needs a recompile: over the limit
        assert forward.wait(30)
    assert f"left {kind(unet)} steps of 2 rows of (4, 12, 12)" in caplog.text
    assert forward.summary()["shapes"] == {"queued": 0, "ready": 1, "eager": 1}
    assert forward.state is CompileState.READY  # the other shape still runs compiled
    for size in (12, 8):
        args = inputs(2, size)
        torch.testing.assert_close(step(forward, unet, args), step(eager_forward, unet, args), rtol=0, atol=0)
    assert (forward.stats.compiled_steps, forward.stats.fallbacks) == (1, 0)


def test_a_compiled_step_that_raises_is_rerun_eagerly(unet: ToyUNet, caplog: pytest.LogCaptureFixture) -> None:
    backend = BrokenAtRunBackend()
    forward = CompiledForward(backend=backend)
    step(forward, unet, inputs(2))
    assert forward.wait(30)
    backend.error = RuntimeError("illegal memory access")
    args = inputs(2)
    with caplog.at_level(logging.WARNING, logger="diffusers_api.denoising.compiled"):
        torch.testing.assert_close(step(forward, unet, args), step(eager_forward, unet, args), rtol=0, atol=0)
    assert (
        f"a compiled {kind(unet)} step failed (RuntimeError: illegal memory access); running it eagerly" in caplog.text
    )
    step(forward, unet, args)  # that shape is eager from now on
    assert forward.summary()["shapes"]["eager"] == 1
    assert (forward.stats.compiled_steps, forward.stats.eager_steps) == (0, 3)


def test_tracing_in_the_server_process_is_refused_untouched() -> None:
    """FX tracing patches torch.nn.Module.__call__ process-wide, which breaks other threads' modules: while the
    server compiles, it is refused before anything is patched."""
    call, getattr_ = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    with _no_tracing_here(), pytest.raises(ColdCache, match="would trace"):
        torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    assert (torch.nn.Module.__call__, torch.nn.Module.__getattr__) == (call, getattr_)
    torch.fx.symbolic_trace(torch.nn.Linear(2, 2))  # allowed again outside


def test_a_cold_cache_is_filled_by_another_process_then_loaded(unet: ToyUNet) -> None:
    backend = ColdCacheBackend()
    forward = CompiledForward(backend=backend, fill_cache=backend.fill)
    step(forward, unet, inputs(2))
    assert forward.wait(30)
    assert backend.fills == 1
    assert forward.state is CompileState.READY
    args = inputs(3)
    step(forward, unet, args)
    assert forward.wait(30)
    torch.testing.assert_close(step(forward, unet, args), step(eager_forward, unet, args), rtol=0, atol=0)
    summary = forward.summary()
    assert (summary["subprocesses"], summary["graphs"], summary["compiled_steps"]) == (1, 1, 1)


def test_a_cache_the_compiling_process_did_not_fill_leaves_the_shape_eager(
    unet: ToyUNet, caplog: pytest.LogCaptureFixture
) -> None:
    backend = ColdCacheBackend(fills_cache=False)  # e.g. the process built a UNet that traces differently
    forward = CompiledForward(backend=backend, fill_cache=backend.fill)
    with caplog.at_level(logging.WARNING, logger="diffusers_api.denoising.compiled"):
        step(forward, unet, inputs(2))
        assert forward.wait(30)
    assert "the compiling process left no cache entry for 2 rows of (4, 8, 8)" in caplog.text
    assert forward.summary()["shapes"] == {"queued": 0, "ready": 0, "eager": 1}
    assert forward.state is CompileState.READY  # other shapes may still compile


def test_a_failed_compiling_process_stops_compiling(unet: ToyUNet) -> None:
    def fail(unet: Any, job: CompileTarget, forward: CompiledForward) -> None:
        raise CompileFailed("the compiling process failed: RuntimeError: no working C++ compiler")

    forward = CompiledForward(backend=ColdCacheBackend(), fill_cache=fail)
    step(forward, unet, inputs(2))
    assert forward.wait(30)
    assert forward.state is CompileState.FAILED
    assert forward.summary()["error"].endswith("no working C++ compiler")
    step(forward, unet, inputs(3))  # not queued: stays eager
    assert forward.summary()["shapes"] == {"queued": 0, "ready": 0, "eager": 2}


def test_out_of_memory_while_compiling_leaves_that_shape_eager(unet: ToyUNet) -> None:
    """The background step runs beside the requests' steps; a batch that does not fit twice stays eager."""
    backend = BrokenAtRunBackend(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    forward = CompiledForward(backend=backend)
    step(forward, unet, inputs(8))
    assert forward.wait(30)
    backend.error = None
    step(forward, unet, inputs(2))
    assert forward.wait(30)
    assert forward.state is CompileState.READY
    assert forward.summary()["shapes"] == {"queued": 0, "ready": 1, "eager": 1}


def test_guards_that_fail_at_run_time_run_eagerly_instead_of_compiling(unet: ToyUNet) -> None:
    """dynamo's run-only mode on the request path: a call its guards reject runs eagerly; nothing compiles."""
    forward = CompiledForward(backend="eager")
    step(forward, unet, inputs(2))
    assert forward.wait(30)
    compiled = forward._unets[id(unet)]
    with torch.enable_grad():  # grad mode is guarded: the compiled graph does not apply
        compiled(*inputs(2)[:3])
    assert forward.stats.fallbacks == 1
    assert forward.stats.graphs == 1


@pytest.mark.parametrize("model_class", [ToyUNet, ToyTransformer], ids=["unet", "transformer"])
def test_an_evicted_unet_is_freed_with_its_compiled_state(model_class: type[ToyUNet]) -> None:
    unet = model_class().eval()
    forward = CompiledForward(backend="eager")
    step(forward, unet, inputs(2))
    assert forward.wait(30)
    step(forward, unet, inputs(2))
    assert forward.stats.compiled_steps == 1
    freed = weakref.ref(unet)
    del unet
    gc.collect()
    assert freed() is None
    assert forward._unets == {}
    assert forward.summary()["shapes"] == {"queued": 0, "ready": 0, "eager": 0}


def flux_inputs(rows: int, tokens: int = 16) -> tuple[Inputs, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(rows * 100 + tokens)
    sample, hidden = torch.randn(rows, tokens, 4, generator=generator), torch.randn(rows, 5, 8, generator=generator)
    added = {"pooled_projections": torch.randn(rows, 6, generator=generator), "guidance": torch.full((rows,), 3.5)}
    shared = {"img_ids": torch.randn(tokens, 3, generator=generator), "txt_ids": torch.zeros(5, 3)}
    return (sample, torch.linspace(0.9, 0.1, rows), hidden, added), shared


def test_a_transformer_compiles_with_inputs_shared_by_all_rows() -> None:
    """Flux: the added inputs take the dynamic batch like the latents, the position ids (no batch axis) are
    compiled at their shapes: another latent grid is another shape, and the compiled step gets the ids it is given."""
    model, forward = ToyFlux().eval(), CompiledForward(backend="eager")

    def flux_step(rows: int, tokens: int = 16) -> None:
        args, shared = flux_inputs(rows, tokens)
        with torch.no_grad():
            expected = eager_forward(model, *args, shared)
            torch.testing.assert_close(forward(model, *args, shared), expected, rtol=0, atol=0)

    flux_step(2)
    assert forward.wait(30)
    flux_step(2)
    flux_step(3)  # a new batch size: a new shape, checked in the background, covered by the same graph
    assert forward.wait(30)
    flux_step(3)
    flux_step(2, tokens=24)  # another resolution: new position ids, another compile
    assert forward.wait(30)
    flux_step(2, tokens=24)
    summary = forward.summary()
    assert summary["shapes"] == {"queued": 0, "ready": 3, "eager": 0}
    assert (summary["graphs"], summary["compiled_steps"], summary["eager_steps"], summary["fallbacks"]) == (2, 3, 3, 0)


def test_pixart_gets_its_micro_conditions_and_mask_compiled() -> None:
    model, forward = ToyPixArt().eval(), CompiledForward(backend="eager")
    sample, timesteps, hidden, _ = inputs(2)
    mask = {"encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    with torch.no_grad():
        expected = eager_forward(model, sample, timesteps, hidden, mask)
        forward(model, sample, timesteps, hidden, mask)
        assert forward.wait(30)
        torch.testing.assert_close(forward(model, sample, timesteps, hidden, mask), expected, rtol=0, atol=0)
    assert (forward.stats.compiled_steps, forward.stats.fallbacks, forward.state) == (1, 0, CompileState.READY)


def test_the_shape_compiled_is_the_one_cuda_graphs_capture() -> None:
    """CudaGraphForward pads CUDA batches to its buckets, so the compile must be for the bucket's batch."""
    graphs = CudaGraphForward(buckets=(1, 2, 4, 8))

    def sample(rows: int, device: str) -> Any:
        return SimpleNamespace(shape=(rows, 4, 8, 8), device=SimpleNamespace(type=device))

    assert [_module_rows(graphs, sample(rows, "cuda")) for rows in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    assert _module_rows(graphs, sample(3, "cpu")) == 3
    assert _module_rows(eager_forward, sample(3, "cuda")) == 3


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="reduce-overhead"):
        CompiledForward(mode="reduce-overhead")


# --- settings, wiring, health ----------------------------------------------------------------------------------


def test_compile_is_off_by_default_and_caches_default_under_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/untouched")  # restored after the test
    monkeypatch.delenv("COMPILE", raising=False)
    plain = make_engine(Settings(models_dir=tmp_path, compile_cache_dir=None))
    assert isinstance(plain.runner.steps.rendezvous.forward, CudaGraphForward)  # type: ignore[attr-defined]

    engine = make_engine(Settings(models_dir=tmp_path, compile=True, compile_cache_dir=None))
    forward = engine.runner.steps.rendezvous.forward  # type: ignore[attr-defined]
    assert isinstance(forward, CompiledForward)
    assert isinstance(forward.base, CudaGraphForward)
    assert forward.mode == "default"
    assert (tmp_path / "torch-compile").is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")


@pytest.mark.parametrize("variable", ["COMPILE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"])
def test_compile_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv("COMPILE", "1")
    monkeypatch.setenv("COMPILE_MODE", "max-autotune-no-cudagraphs")
    monkeypatch.setenv(variable, "/volume/compile-cache")
    settings = Settings()
    assert settings.compile is True
    assert settings.compile_mode == "max-autotune-no-cudagraphs"
    assert settings.compile_cache_dir == Path("/volume/compile-cache")


def test_health_reports_compile_progress(unet: ToyUNet) -> None:
    forward = CompiledForward(backend="eager")
    engine = FakeEngine(shared=SharedSteps(Rendezvous(forward=forward)))
    with TestClient(create_app(Settings(), engine)) as client:
        assert client.get("/health").json()["compile"]["state"] == "waiting"
        step(forward, unet, inputs(2))
        assert forward.wait(30)
        report = client.get("/health").json()["compile"]
        assert report["state"] == "ready"
        assert report["shapes"]["ready"] == 1
        engine.shared = SharedSteps(Rendezvous())
        assert client.get("/health").json()["compile"] == {"state": "off"}
