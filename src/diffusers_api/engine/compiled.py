"""Optional `torch.compile` of the UNet, compiled off the request path (COMPILE=1).

`CompiledForward` is a StepBatcher forward that wraps another one (eager, or `CudaGraphForward`). Compiling
a UNet takes minutes, so it never happens on a request's thread:

- The first time a step of a new shape arrives, the step runs through the base forward as before (eagerly, or
  replayed as an eager CUDA graph) and a copy of its inputs goes to one background thread, which compiles the
  UNet for that shape. Until that compile is done, steps of that shape keep running eagerly.
- Request threads call the compiled code in dynamo's run-only mode (`torch._dynamo.run`): if its guards do
  not match a call, that call runs eagerly instead of compiling. So nothing ever compiles on the request path,
  and a compiled step is always a correct step.
- The batch dimension is marked dynamic, so one compile serves many batch sizes; dynamo still specializes
  where the kernels' choice depends on the batch (size 1; on the CPU, oneDNN convolutions from 16 rows), and
  those shapes get their own compile. A shape counts as ready only when the background thread has seen the
  compiled code run for it.
- With CUDA graphs the base forward pads a batch up to its bucket and captures the call: it is given the
  compiled UNet once the bucket's shape is ready, so the graph it captures replays the compiled kernels.
  (Inductor's own CUDA graphs, mode="reduce-overhead", are not used: they record one graph per distinct batch
  and are bound to the thread that recorded them, while our steps run on whichever request thread completes a
  round.)
- A compile that raises logs a warning and turns compiling off for good: eager steps go on serving. A shape
  dynamo will not compile (its recompile limit) stays eager. A compiled step that raises is rerun eagerly.

Compiled artifacts persist across restarts in inductor's on-disk caches (FX graph cache, AOTAutograd cache,
Triton kernels, autotuning and dynamic-shape decisions), kept under TORCHINDUCTOR_CACHE_DIR: `use_cache_dir`
points it at MODELS_DIR/torch-compile unless COMPILE_CACHE_DIR says otherwise. A warm cache skips inductor's
code generation and kernel builds; dynamo still traces the UNet once per shape in each new process.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .batcher import UNetForward, eager_forward
from .graphs import CudaGraphForward

log = logging.getLogger(__name__)

Backend = Callable[[Any, list[Any]], Callable[..., Any]]
"""A dynamo backend: (FX graph module, example inputs) -> the callable that runs the graph."""

MODES = ("default", "max-autotune-no-cudagraphs")


class CompileState(enum.StrEnum):
    WAITING = "waiting"  # no step has arrived yet, so there is nothing to compile
    COMPILING = "compiling"
    READY = "ready"  # every shape met so far is compiled (or cannot be, and runs eagerly)
    FAILED = "failed"  # a compile raised: eager for good


class _Shape(enum.Enum):
    QUEUED = "queued"
    READY = "ready"
    EAGER = "eager"  # dynamo would not compile it; stays eager


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


def _unet_step(unet: Any, sample: Any, timesteps: Any, hidden: Any, added: dict[str, Any] | None) -> Any:
    """The function dynamo compiles; the same call as `eager_forward`, in a code object of its own."""
    return unet(sample, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


@dataclass
class CompileStats:
    graphs: int = 0  # graphs the backend compiled (a shape that an earlier graph covers needs none)
    compile_s: float = 0.0  # time the background thread spent compiling
    compiled_steps: int = 0  # steps given to the compiled UNet (with CUDA graphs: graphs captured from it)
    eager_steps: int = 0  # steps run eagerly: shapes not ready yet, or never compiled
    fallbacks: int = 0  # calls of the compiled UNet whose guards failed, so that ran eagerly
    last_error: str | None = None


@dataclass
class _Job:
    key: tuple[Any, ...]
    unet: weakref.ref[Any]
    inputs: tuple[Any, Any, Any, dict[str, Any] | None]
    grad: bool
    inference: bool


class CompiledForward:
    """A StepBatcher forward: `base` until the UNet is compiled for a step's shape, then `base` over the
    compiled UNet. `backend` is a dynamo backend name or callable (tests inject fast or failing ones); `mode`
    applies to inductor."""

    def __init__(
        self,
        base: UNetForward | None = None,
        backend: str | Backend = "inductor",
        mode: str = "default",
        recompile_limit: int = 64,  # per code object; dynamo's default (8) is low for many shapes and models
        switch_interval_s: float | None = 0.0005,  # the GIL's, while compiling; None leaves Python's (5 ms)
    ) -> None:
        import torch._dynamo  # at server start: its import takes seconds, which no request should wait for

        if mode not in MODES:
            raise ValueError(f"compile mode {mode!r} is not one of {MODES} (our CUDA graphs replace inductor's)")
        self.base = base or eager_forward
        self.backend = backend
        self.mode = mode
        self.recompile_limit = recompile_limit
        self.switch_interval_s = switch_interval_s
        self.stats = CompileStats()
        self._run_only = torch._dynamo.run(_unet_step)
        self._compiling: Callable[..., Any] | None = None
        self._shapes: dict[tuple[Any, ...], _Shape] = {}
        self._unets: dict[int, _CompiledUNet] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # shapes queued or compiling
        self._failed = False
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._worker: threading.Thread | None = None

    # --- the request path --------------------------------------------------------------------------------------

    def __call__(self, unet: Any, sample: Any, timesteps: Any, hidden: Any, added: dict[str, Any] | None) -> Any:
        if not self._failed:
            key, state = self._shape(unet, sample, timesteps, hidden, added)
            if state is _Shape.READY:
                try:
                    output = self.base(self._unets[id(unet)], sample, timesteps, hidden, added)
                    self.stats.compiled_steps += 1
                    return output
                except Exception as exc:  # compiling may only make a step faster, never fail it
                    log.warning("a compiled UNet step failed (%s); running it eagerly", _reason(exc))
                    log.debug("compiled step failure", exc_info=True)
                    with self._lock:
                        self._shapes[key] = _Shape.EAGER
        self.stats.eager_steps += 1
        return self.base(unet, sample, timesteps, hidden, added)

    def prepare(self, unet: Any, sample: Any, timesteps: Any, hidden: Any, added: dict[str, Any] | None) -> None:
        """Compile for these inputs' shape ahead of the first request (e.g. right after a model loads)."""
        if not self._failed:
            self._shape(unet, sample, timesteps, hidden, added)

    def _shape(
        self, unet: Any, sample: Any, timesteps: Any, hidden: Any, added: dict[str, Any] | None
    ) -> tuple[tuple[Any, ...], _Shape]:
        """This call's shape and its state; a shape met for the first time is queued for compiling."""
        rows = _module_rows(self.base, sample)
        key = _key(unet, rows, sample, hidden, added)
        with self._lock:
            state = self._shapes.get(key)
            if state is not None:
                return key, state
            if id(unet) not in self._unets:
                self._unets[id(unet)] = _CompiledUNet(unet, self)
                weakref.finalize(unet, self._forget, id(unet))
            self._shapes[key] = _Shape.QUEUED
            self._pending += 1
        self._queue(key, unet, rows, (sample, timesteps, hidden, added))
        return key, _Shape.QUEUED

    def _forget(self, unet_id: int) -> None:
        """A UNet was freed (model eviction): drop its stand-in (and with it its CUDA graphs) and its shapes,
        before another object can reuse its id."""
        with self._lock:
            self._unets.pop(unet_id, None)
            for key in [key for key in self._shapes if key[0] == unet_id]:
                del self._shapes[key]

    # --- the background thread -------------------------------------------------------------------------------

    def _queue(self, key: tuple[Any, ...], unet: Any, rows: int, inputs: tuple[Any, ...]) -> None:
        import torch

        sample, timesteps, hidden, added = inputs
        example = (
            _rows(sample, rows),
            _rows(timesteps, rows),
            _rows(hidden, rows),
            {name: _rows(value, rows) for name, value in added.items()} if added else None,
        )
        # dynamo guards on grad and inference mode, which are per thread: compile in the request's modes
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        self._jobs.put(_Job(key, weakref.ref(unet), example, *modes))
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="torch-compile", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        import torch

        while True:
            job = self._jobs.get()
            try:
                state = self._run(job)
            except torch.cuda.OutOfMemoryError:
                # the example step runs beside the requests' steps: a big batch may not fit twice
                log.warning("out of memory compiling for %s; that shape stays eager", _describe(job.key))
                state = _Shape.EAGER
            except Exception as exc:
                self._failed, self.stats.last_error = True, _reason(exc)
                log.warning("torch.compile failed (%s); the UNet runs eagerly from now on", self.stats.last_error)
                log.debug("compile failure", exc_info=True)
                state = _Shape.EAGER
            with self._lock:
                if job.key in self._shapes:
                    self._shapes[job.key] = state
                self._pending -= 1
                self._idle.notify_all()

    def _run(self, job: _Job) -> _Shape:
        """Compile for the job's shape (dynamo reuses an earlier compile when its guards match) and run it once:
        the shape is ready only if the compiled code ran."""
        import torch

        unet = job.unet()
        if unet is None or self._failed:
            return _Shape.EAGER
        sample, timesteps, hidden, added = job.inputs
        if sample.shape[0] > 1:  # a batch of one is always specialised; marking it dynamic changes nothing
            for tensor in (sample, timesteps, hidden, *(added or {}).values()):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        started, before, graphs = time.perf_counter(), _graphs_run(), self.stats.graphs
        with (
            _switch_interval(self.switch_interval_s),
            torch.inference_mode(job.inference),
            torch.set_grad_enabled(job.grad),
            torch._dynamo.config.patch(recompile_limit=self.recompile_limit),
        ):
            self._compiler()(unet, sample, timesteps, hidden, added)
        seconds = time.perf_counter() - started
        if _graphs_run() == before:
            log.warning("torch.compile left UNet steps of %s eager (see dynamo's log)", _describe(job.key))
            return _Shape.EAGER
        self.stats.compile_s += seconds
        new = self.stats.graphs - graphs
        log.info("UNet compiled for %s in %.1f s (%d new graphs)", _describe(job.key), seconds, new)
        return _Shape.READY

    def _compiler(self) -> Callable[..., Any]:
        import torch

        if self._compiling is None:
            backend = _counting(_backend(self.backend, self.mode), self._compiled_one)
            self._compiling = torch.compile(_unet_step, backend=backend)
        return self._compiling

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
        unet = self._unet()
        if unet is None:
            raise RuntimeError("the UNet behind this compiled stand-in was freed")
        before = _graphs_run()
        output = self._owner._run_only(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        if _graphs_run() == before:
            self._owner.stats.fallbacks += 1
        return (output,)


# --- helpers -------------------------------------------------------------------------------------------------


def use_cache_dir(directory: Path) -> None:
    """Keep torch.compile's on-disk caches in `directory`, so that a restart (or another worker sharing the
    directory) reuses compiled graphs and kernels. Inductor reads TORCHINDUCTOR_CACHE_DIR each time it looks
    for its cache; the Triton and autotuning caches live under it too."""
    import torch._functorch.config
    import torch._inductor.config

    directory = directory.expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    # on by default in recent torch; explicit for older builds
    torch._inductor.config.fx_graph_cache = True
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = True


@contextmanager
def _switch_interval(seconds: float | None) -> Iterator[None]:
    """Hand the GIL over sooner while compiling. Dynamo traces in Python, holding the GIL; a request thread
    releases it in every torch op and, at Python's default interval (5 ms), may wait that long to get it back:
    eager steps measured several times slower during a compile."""
    if seconds is None:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


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


def _key(unet: Any, rows: int, sample: Any, hidden: Any, added: dict[str, Any] | None) -> tuple[Any, ...]:
    shapes = tuple(sorted((name, tuple(value.shape[1:]), value.dtype) for name, value in (added or {}).items()))
    return (
        id(unet),
        rows,
        tuple(sample.shape[1:]),
        sample.dtype,
        str(sample.device),
        tuple(hidden.shape[1:]),
        hidden.dtype,
        shapes,
    )


def _describe(key: tuple[Any, ...]) -> str:
    return f"{key[1]} rows of {key[2]} {key[3]} on {key[4]}"


def _rows(tensor: Any, rows: int) -> Any:
    """A contiguous copy of `tensor` with `rows` rows (its first row repeated), as the base forward passes it."""
    import torch

    copy = tensor.detach().clone(memory_format=torch.contiguous_format)
    if rows > copy.shape[0]:
        copy = torch.cat([copy, copy[:1].expand(rows - copy.shape[0], *copy.shape[1:])])
    return copy
