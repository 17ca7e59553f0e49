"""Optional `torch.compile` of the denoising model (COMPILE=1): the UNet, or the diffusion transformer of SD3, Flux and
PixArt, compiled off the request path.

`CompiledForward` is a StepBatcher forward that wraps another one (eager, or `CudaGraphForward`). What follows
says "UNet" for either kind of model. Compiling a UNet takes minutes and, in torch 2.x, is not safe beside other
threads running modules: the FX tracing inside it (AOTAutograd's make_fx, inductor's pattern matcher) patches
`torch.nn.Module.__call__` for the whole process while it runs, so a request thread's eager step lands in the
tracer and fails ("module is not installed as a submodule", pytorch#112775). Hence:

- The first step of each new shape runs through the base forward as before (eagerly, or replayed as an eager
  CUDA graph) and queues a copy of its inputs for one background thread; steps of that shape keep running
  eagerly until it is compiled.
- The background thread compiles from inductor's on-disk caches only: while it runs `torch.compile`, FX
  tracing is refused (`_no_tracing_here`), so a cache miss raises instead of tracing. On a miss the UNet is
  compiled in a separate process (compile_worker.py, a UNet of the same class, config,
  precision and memory format with placeholder weights, the same inputs' shapes), which fills the caches; then
  the background thread loads from them. The heavy work (tracing, code generation, C++/Triton builds) never
  runs in the server's process; what does is dynamo's tracing of the step and the cache lookups.
- Request threads call the compiled code in dynamo's run-only mode (`torch._dynamo.run`): a call its guards do
  not cover runs eagerly instead of compiling.
- Shapes: the batch dimension is marked dynamic and nothing else is (automatic dynamic shapes are off, so both
  processes trace the same graph), so one compile per resolution serves most batch sizes; dynamo still
  specializes where the kernels' choice depends on the batch (one row; on the CPU, oneDNN convolutions from 16
  rows), and those shapes get one more compile each. A shape counts as ready once the background thread has
  seen the compiled code run for it.
- With CUDA graphs the base forward pads a batch up to its bucket and captures the call: it is given the
  compiled UNet once the bucket's shape is ready, so the graph it captures replays inductor's kernels.
  (Inductor's own CUDA graphs, mode="reduce-overhead", are not used: they record one graph per distinct batch
  and belong to the thread that recorded them, while our steps run on the denoising loop's thread or on
  whichever thread completes a rendezvous round.)
- Transformers: the same, over a step that calls the model by name (`_transformer_step`, as `eager_forward`
  does): its added inputs (SD3 and Flux's `pooled_projections`, Flux's `guidance`, PixArt's
  `encoder_attention_mask`) have a batch axis, marked dynamic like the sample's; Flux's position ids (`img_ids`,
  `txt_ids`, the forward's `shared` inputs) have none and are compiled at their shapes; PixArt's micro-conditions
  (`added_cond_kwargs`, both None) are passed as `eager_forward` passes them.
- Compiling can only make a step faster, never fail it: a compile that fails logs a warning and no new shape
  is compiled after it; a shape dynamo will not compile, or that runs out of memory, stays eager; a compiled
  step that raises is rerun eagerly.

The caches (FX graph, AOTAutograd, Triton kernels, autotuning) live under TORCHINDUCTOR_CACHE_DIR, which
`use_cache_dir` points at MODELS_DIR/torch-compile unless COMPILE_CACHE_DIR says otherwise: they persist across
restarts, so a warm start goes straight to loading.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .forward import ForwardKey, UNetForward, eager_forward, is_transformer, takes_micro_conditions
from .graphs import CudaGraphForward, _shapes

log = logging.getLogger(__name__)

Backend = Callable[[Any, list[Any]], Callable[..., Any]]
"""A dynamo backend: (FX graph module, example inputs) -> the callable that runs the graph."""

Inputs = tuple[Any, Any, Any, dict[str, Any] | None]
"""A step's inputs: sample, timesteps (one per row), encoder hidden states, added conditioning (a UNet's
`added_cond_kwargs`, a transformer's other inputs with a batch axis)."""

ShapeKey = tuple[int, ForwardKey, tuple[Any, ...]]
"""A compiled shape: the rows the model runs at, what else its inputs' shapes are, and the shapes of the inputs
without a batch axis (Flux's position ids)."""

MODES = ("default", "max-autotune-no-cudagraphs")


class CompileState(enum.StrEnum):
    WAITING = "waiting"  # no step has arrived yet, so there is nothing to compile
    COMPILING = "compiling"
    READY = "ready"  # every shape met so far is compiled (or cannot be, and runs eagerly)
    FAILED = "failed"  # a compile failed: shapes met from then on stay eager


class _Shape(enum.Enum):
    QUEUED = "queued"
    READY = "ready"
    EAGER = "eager"  # not compiled, for good


class ColdCache(Exception):
    """Compiling needs FX tracing here, which is not safe beside threads running modules: the cache missed."""


class CompileFailed(Exception):
    """The compiling process failed."""


@dataclass
class CompileStats:
    graphs: int = 0  # graphs loaded or compiled in this process (a shape an earlier graph covers needs none)
    compile_s: float = 0.0  # time the background thread spent on compiles (subprocesses included)
    subprocesses: int = 0  # compiles that had to fill the cache in a process of their own
    compiled_steps: int = 0  # steps given to the compiled UNet (with CUDA graphs: graphs captured from it)
    eager_steps: int = 0  # steps run eagerly: shapes not ready yet, or never compiled
    fallbacks: int = 0  # calls of the compiled UNet whose guards failed, so that ran eagerly
    last_error: str | None = None


@dataclass
class CompileTarget:
    """A shape the background thread compiles the model (UNet or transformer) for."""

    key: ShapeKey
    unet: weakref.ref[Any]
    inputs: Inputs  # copies, at the batch the base forward runs the model at
    grad: bool  # the request thread's modes, which are per thread and which dynamo guards on
    inference: bool
    shared: dict[str, Any] | None = None  # a transformer's inputs without a batch axis (Flux's position ids)

    def describe(self) -> str:
        rows, key, _ = self.key
        return key.describe(rows)


CacheFiller = Callable[[Any, CompileTarget, "CompiledForward"], object]
"""Fills the compile caches for (unet, target); raises CompileFailed. The default runs a subprocess."""


# --- what compiles, in the server and in the compiling process --------------------------------------------------


def _unet_step(unet: Any, sample: Any, timesteps: Any, hidden: Any, added: dict[str, Any] | None) -> Any:
    """The function dynamo compiles for a UNet; the same call as `eager_forward`, in a code object of its own."""
    return unet(sample, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


def _transformer_step(model: Any, sample: Any, timesteps: Any, hidden: Any, named: dict[str, Any]) -> Any:
    """The function dynamo compiles for a diffusion transformer: `eager_forward`'s call, its inputs by name
    (`_named` gathers them)."""
    return model(hidden_states=sample, timestep=timesteps, encoder_hidden_states=hidden, **named, return_dict=False)[0]


def _named(model: Any, added: dict[str, Any] | None, shared: dict[str, Any] | None) -> dict[str, Any]:
    """A transformer's inputs by name besides the sample, timesteps and text, as `eager_forward` passes them."""
    named = (added or {}) | (shared or {})
    if takes_micro_conditions(model):
        named["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return named


# Graphs the compiled code ran on this thread. The backend wraps every graph it compiles so that running it
# counts here: before/after a call, this tells whether the compiled code ran or dynamo's guards sent the call
# down the eager path.
_ran = threading.local()


def _graphs_run() -> int:
    return getattr(_ran, "graphs", 0)


def _counting(backend: Backend, compiled_one: Callable[[], None]) -> Backend:
    def compile_graph(graph: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = backend(graph, example_inputs)
        compiled_one()

        def run(*args: Any) -> Any:
            _ran.graphs = _graphs_run() + 1
            return compiled(*args)

        return run

    return compile_graph


def _backend(backend: str | Backend, mode: str) -> Backend:
    if callable(backend):
        return backend
    if backend != "inductor":
        import torch._dynamo

        inner: Backend = torch._dynamo.lookup_backend(backend)
        return inner
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    # what torch.compile(mode=...) does for inductor; compile_fx's return type also covers AOT compilation
    return cast(Backend, functools.partial(compile_fx, config_patches=list_mode_options(mode)))


def compile_step(compiler: Callable[..., Any], unet: Any, target: CompileTarget, recompile_limit: int) -> bool:
    """Run `compiler` (torch.compile of `_unet_step`, or of `_transformer_step` for a transformer) once on the
    target's inputs, which compiles them if no earlier graph's guards cover them; True if the compiled code ran.
    The same call in both processes, so that both trace the same graph and share its cache entries."""
    import torch

    sample, timesteps, hidden, added = target.inputs
    if sample.shape[0] > 1:  # a batch of one is always specialised; marking it dynamic changes nothing
        for tensor in (sample, timesteps, hidden, *(added or {}).values()):  # not the shared inputs: no batch axis
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    # only the batch is dynamic: automatic dynamic shapes would make a second resolution's graph depend on
    # what this process met before, which the compiling process cannot know
    dynamo = {"recompile_limit": recompile_limit, "automatic_dynamic_shapes": False}
    if hasattr(torch._dynamo.config, "automatic_dynamic_local_pgo"):
        dynamo["automatic_dynamic_local_pgo"] = False
    before = _graphs_run()
    with (
        torch.inference_mode(target.inference),
        torch.set_grad_enabled(target.grad),
        torch._dynamo.config.patch(dynamo),
    ):
        if is_transformer(unet):
            compiler(unet, sample, timesteps, hidden, _named(unet, added, target.shared))
        else:
            compiler(unet, sample, timesteps, hidden, added)
    return _graphs_run() > before


# --- the forward -------------------------------------------------------------------------------------------------


class CompiledForward:
    """A StepBatcher forward: `base` until the model (UNet or transformer) is compiled for a step's shape, then
    `base` over the compiled model. `backend` is a dynamo backend name or callable and `fill_cache` what fills its
    caches on a miss (tests inject fast, slow and failing ones); `mode` applies to inductor."""

    def __init__(
        self,
        base: UNetForward | None = None,
        backend: str | Backend = "inductor",
        mode: str = "default",
        fill_cache: CacheFiller | None = None,
        recompile_limit: int = 64,  # per code object; dynamo's default (8) is low for many shapes and models
    ) -> None:
        import torch._dynamo  # at server start: its import takes seconds, which no request should wait for

        if mode not in MODES:
            raise ValueError(f"compile mode {mode!r} is not one of {MODES} (our CUDA graphs replace inductor's)")
        self.base = base or eager_forward
        self.backend = backend
        self.mode = mode
        self.fill_cache = fill_cache or _compile_in_subprocess
        self.recompile_limit = recompile_limit
        self.stats = CompileStats()
        self._run_only = {False: torch._dynamo.run(_unet_step), True: torch._dynamo.run(_transformer_step)}
        self._compilers: dict[bool, Callable[..., Any]] = {}  # by is_transformer
        self._shapes: dict[tuple[Any, ...], _Shape] = {}
        self._unets: dict[int, _CompiledUNet | _CompiledTransformer] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # shapes queued or compiling
        self._failed = False
        self._targets: queue.Queue[CompileTarget] = queue.Queue()
        self._worker: threading.Thread | None = None

    # --- the request path --------------------------------------------------------------------------------------

    def __call__(
        self,
        unet: Any,
        sample: Any,
        timesteps: Any,
        hidden: Any,
        added: dict[str, Any] | None,
        shared: dict[str, Any] | None = None,
    ) -> Any:
        key, state = self._shape(unet, sample, timesteps, hidden, added, shared)
        if state is _Shape.READY:
            try:
                output = self.base(self._unets[id(unet)], sample, timesteps, hidden, added, shared)
                self.stats.compiled_steps += 1
                return output
            except Exception as exc:  # compiling may only make a step faster, never fail it
                log.warning("a compiled %s step failed (%s); running it eagerly", _kind(unet), _reason(exc))
                log.debug("compiled step failure", exc_info=True)
                with self._lock:
                    self._shapes[key] = _Shape.EAGER
        self.stats.eager_steps += 1
        return self.base(unet, sample, timesteps, hidden, added, shared)

    def _shape(
        self,
        unet: Any,
        sample: Any,
        timesteps: Any,
        hidden: Any,
        added: dict[str, Any] | None,
        shared: dict[str, Any] | None,
    ) -> tuple[tuple[Any, ...], _Shape]:
        """This call's shape and its state; a shape met for the first time is queued for compiling."""
        rows = _module_rows(self.base, sample)
        key = (rows, ForwardKey.of(unet, sample, hidden, added), _shapes(shared))
        with self._lock:
            state = self._shapes.get(key)
            if state is not None:
                return key, state
            if id(unet) not in self._unets:
                stand_in = _CompiledTransformer if is_transformer(unet) else _CompiledUNet
                self._unets[id(unet)] = stand_in(unet, self)
                weakref.finalize(unet, self._forget, id(unet))
            if self._failed:
                self._shapes[key] = _Shape.EAGER
                return key, _Shape.EAGER
            self._shapes[key] = _Shape.QUEUED
            self._pending += 1
        self._queue(key, unet, rows, (sample, timesteps, hidden, added), shared)
        return key, _Shape.QUEUED

    def _forget(self, unet_id: int) -> None:
        """A UNet was freed (model eviction): drop its stand-in (and with it its CUDA graphs) and its shapes,
        before another object can reuse its id."""
        with self._lock:
            self._unets.pop(unet_id, None)
            for key in [key for key in self._shapes if key[1].module == unet_id]:
                del self._shapes[key]

    # --- the background thread -------------------------------------------------------------------------------

    def _queue(self, key: ShapeKey, unet: Any, rows: int, inputs: Inputs, shared: dict[str, Any] | None) -> None:
        import torch

        sample, timesteps, hidden, added = inputs
        example = (
            _rows(sample, rows),
            _rows(timesteps, rows),
            _rows(hidden, rows),
            {name: _rows(value, rows) for name, value in added.items()} if added else None,
        )
        copies = {name: value.detach().clone() for name, value in shared.items()} if shared else None
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        self._targets.put(CompileTarget(key, weakref.ref(unet), example, grad, inference, copies))
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="torch-compile", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            target = self._targets.get()
            started = time.perf_counter()
            state = self._compile(target)
            with self._lock:
                self.stats.compile_s += time.perf_counter() - started
                if target.key in self._shapes:
                    self._shapes[target.key] = state
                self._pending -= 1
                self._idle.notify_all()

    def _compile(self, target: CompileTarget) -> _Shape:
        import torch

        unet = target.unet()
        if unet is None or self._failed:
            return _Shape.EAGER
        try:
            return self._compile_unet(unet, target)
        except torch.cuda.OutOfMemoryError:
            # the example step runs beside the requests' steps: a big batch may not fit twice
            log.warning("out of memory compiling for %s; that shape stays eager", target.describe())
        except Exception as exc:
            self._failed, self.stats.last_error = True, _reason(exc)
            log.warning("torch.compile failed (%s); shapes met from now on run eagerly", self.stats.last_error)
            log.debug("compile failure", exc_info=True)
        return _Shape.EAGER

    def _compile_unet(self, unet: Any, target: CompileTarget) -> _Shape:
        started = time.perf_counter()
        try:
            ran = self._load(unet, target)
        except ColdCache:
            log.info("compiling the %s for %s in a process of its own", _kind(unet), target.describe())
            self.stats.subprocesses += 1
            self.fill_cache(unet, target, self)
            try:
                ran = self._load(unet, target)
            except ColdCache:
                log.warning("the compiling process left no cache entry for %s; it stays eager", target.describe())
                return _Shape.EAGER
        if not ran:
            log.warning("torch.compile left %s steps of %s eager (see dynamo's log)", _kind(unet), target.describe())
            return _Shape.EAGER
        log.info("%s compiled for %s in %.1f s", _kind(unet), target.describe(), time.perf_counter() - started)
        return _Shape.READY

    def _load(self, unet: Any, target: CompileTarget) -> bool:
        """Compile in this process from the caches only: raises ColdCache where it would have to trace."""
        try:
            with _no_tracing_here():
                return compile_step(self.compiler(is_transformer(unet)), unet, target, self.recompile_limit)
        except Exception as exc:
            if _caused_by(exc, ColdCache):
                raise ColdCache(str(exc)) from None
            raise

    def compiler(self, transformer: bool = False) -> Callable[..., Any]:
        """torch.compile of the UNet's or the transformer's step with this forward's backend (each built once:
        dynamo caches per function)."""
        import torch

        if transformer not in self._compilers:
            backend = _counting(_backend(self.backend, self.mode), self._compiled_one)
            self._compilers[transformer] = torch.compile(
                _transformer_step if transformer else _unet_step, backend=backend
            )
        return self._compilers[transformer]

    def _compiled_one(self) -> None:
        self.stats.graphs += 1

    # --- status ----------------------------------------------------------------------------------------------

    @property
    def state(self) -> CompileState:
        with self._lock:
            if self._failed:
                return CompileState.FAILED
            if self._pending:
                return CompileState.COMPILING
            return CompileState.READY if self._shapes else CompileState.WAITING

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no compile is queued or running; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def summary(self) -> dict[str, Any]:
        """For /health: the state, the shapes met by state, and how the steps ran."""
        with self._lock:
            shapes = list(self._shapes.values())
        stats = self.stats
        summary: dict[str, Any] = {
            "state": self.state.value,
            "mode": self.mode,
            "shapes": {state.value: shapes.count(state) for state in _Shape},
            "graphs": stats.graphs,
            "subprocesses": stats.subprocesses,
            "compile_s": round(stats.compile_s, 1),
            "compiled_steps": stats.compiled_steps,
            "eager_steps": stats.eager_steps,
            "fallbacks": stats.fallbacks,
        }
        if stats.last_error:
            summary["error"] = stats.last_error
        return summary


class _CompiledUNet:
    """Stands in for a UNet inside the base forward: runs the compiled code where dynamo's guards match the
    call, and the UNet eagerly where they do not (never compiling). Holds the UNet weakly, so that an evicted
    model is freed, and with it this stand-in and the CUDA graphs captured from it."""

    def __init__(self, unet: Any, owner: CompiledForward) -> None:
        self._unet = weakref.ref(unet)
        self._owner = owner

    def __call__(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = False,
    ) -> tuple[Any]:
        unet = _alive(self._unet, "UNet")
        return (_run_counted(self._owner, False, unet, sample, timestep, encoder_hidden_states, added_cond_kwargs),)


class _CompiledTransformer:
    """`_CompiledUNet` for a diffusion transformer: called as `eager_forward` calls a transformer (by name; its
    `forward` says so to `is_transformer`), it adds what `eager_forward` adds for the model itself (PixArt's
    micro-conditions) and runs the compiled transformer step."""

    def __init__(self, model: Any, owner: CompiledForward) -> None:
        self._model = weakref.ref(model)
        self._owner = owner

    def forward(
        self,
        hidden_states: Any,
        timestep: Any = None,
        encoder_hidden_states: Any = None,
        return_dict: bool = False,
        **inputs: Any,
    ) -> tuple[Any]:
        model = _alive(self._model, "transformer")
        named = _named(model, inputs, None)
        return (_run_counted(self._owner, True, model, hidden_states, timestep, encoder_hidden_states, named),)

    __call__ = forward


def _alive(ref: weakref.ref[Any], what: str) -> Any:
    """The model behind a compiled stand-in, which holds it weakly."""
    model = ref()
    if model is None:
        raise RuntimeError(f"the {what} behind this compiled stand-in was freed")
    return model


def _run_counted(owner: CompiledForward, transformer: bool, model: Any, *args: Any) -> Any:
    """The compiled step of `model`, counted as a fallback where dynamo's guards sent it to the eager code."""
    before = _graphs_run()
    output = owner._run_only[transformer](model, *args)
    if _graphs_run() == before:
        owner.stats.fallbacks += 1
    return output


# --- compiling in a process of its own ---------------------------------------------------------------------------


_REFUSING = threading.Lock()


@contextmanager
def _no_tracing_here() -> Iterator[None]:
    """Refuse FX tracing while this process compiles. FX's tracer patches `torch.nn.Module.__call__` and
    `__getattr__` process-wide while it traces, which breaks every other thread's modules meanwhile; refusing
    the patch raises ColdCache before anything changes. Only the compile thread traces in the server, so the
    refusal meets no one else. (This reaches into `torch.fx._symbolic_trace._Patcher`; were it gone, tracing
    would fail here differently and compiling would stop with a warning, still without harm.)"""
    import torch
    from torch.fx import _symbolic_trace

    patcher = _symbolic_trace._Patcher
    with _REFUSING:  # one refusal at a time, so that each puts back what it found
        allowed = patcher.patch_method

        def refuse(self: Any, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
            if cls is torch.nn.Module:
                raise ColdCache(f"compiling would trace here (it would patch torch.nn.Module.{name})")
            allowed(self, cls, name, new_fn, deduplicate)

        patcher.patch_method = refuse  # type: ignore[method-assign]
        try:
            yield
        finally:
            patcher.patch_method = allowed  # type: ignore[method-assign]


# --- helpers -------------------------------------------------------------------------------------------------


def use_cache_dir(directory: Path) -> None:
    """Keep torch.compile's on-disk caches in `directory`, so that a restart (or another worker sharing the
    directory) reuses compiled graphs and kernels. Inductor reads TORCHINDUCTOR_CACHE_DIR each time it looks
    for its cache; the Triton and autotuning caches live under it too, and compiling processes inherit it."""
    import torch._functorch.config
    import torch._inductor.config

    directory = directory.expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    # on by default in recent torch; explicit for older builds. Compiling processes get them from the
    # environment, as the defaults they are.
    torch._inductor.config.fx_graph_cache = True
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = True


def _kind(model: Any) -> str:
    return "transformer" if is_transformer(model) else "UNet"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `kind` is in the chain of `exc` (dynamo wraps a backend's errors in BackendCompilerFailed)."""
    seen: BaseException | None = exc
    for _ in range(32):  # a chain is short; the bound only guards against a cycle
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = getattr(seen, "inner_exception", None) or seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    """The first line of the root cause: dynamo wraps a backend's error in a long BackendCompilerFailed."""
    cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def _module_rows(base: UNetForward, sample: Any) -> int:
    """The batch the base forward runs the UNet at: CudaGraphForward pads CUDA batches up to its bucket."""
    rows = int(sample.shape[0])
    if isinstance(base, CudaGraphForward) and sample.device.type == "cuda":
        return next((bucket for bucket in base.buckets if bucket >= rows), rows)
    return rows


def _rows(tensor: Any, rows: int) -> Any:
    """A contiguous copy of `tensor` with `rows` rows (its first row repeated), as the base forward passes it."""
    import torch

    copy = tensor.detach().clone(memory_format=torch.contiguous_format)
    if rows > copy.shape[0]:
        copy = torch.cat([copy, copy[:1].expand(rows - copy.shape[0], *copy.shape[1:])])
    return copy


def _compile_in_subprocess(unet: Any, target: CompileTarget, forward: CompiledForward) -> dict[str, Any]:
    from .compile_worker import compile_in_subprocess

    return compile_in_subprocess(unet, target, forward)
