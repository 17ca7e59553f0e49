"""The GPU fast path for batched model steps (UNets and diffusion transformers alike): CUDA graphs per (batch
bucket, shapes), inputs padded to the bucket.

At small batches a model step on a big GPU is bound by kernel launches, not arithmetic: replaying the whole step
as one CUDA graph removes the launch cost. A graph has fixed shapes, so batches are padded up to a bucket
(BUCKETS rows: powers of two, with steps between them from 8 rows up, so that padding wastes at most a third of
a large step) and one graph is captured per bucket and conditioning shape, the first time it is
needed (capture costs about three eager steps). All graphs share one memory pool. Anything that is not on a
CUDA device, is larger than the largest bucket, or fails to capture runs eagerly: the graph path can only
make a step faster, never fail it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from .forward import ForwardKey, eager_forward

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class _Graph:
    graph: Any
    sample: Any
    timesteps: Any
    hidden: Any
    added: dict[str, Any] | None
    shared: dict[str, Any] | None  # inputs without a batch axis (Flux's position ids): copied whole, not padded
    output: Any

    def run(
        self, sample: Any, timesteps: Any, hidden: Any, added: dict[str, Any] | None, shared: dict[str, Any] | None
    ) -> Any:
        rows = sample.shape[0]
        self.sample[:rows].copy_(sample)
        self.timesteps[:rows].copy_(timesteps)
        self.hidden[:rows].copy_(hidden)
        for name, value in (added or {}).items():
            assert self.added is not None
            self.added[name][:rows].copy_(value)
        for name, value in (shared or {}).items():
            assert self.shared is not None
            self.shared[name].copy_(value)
        self.graph.replay()
        # the next replay overwrites the static output: callers keep their own copy
        return self.output[:rows].clone()


class CudaGraphForward:
    """A StepBatcher forward that replays captured CUDA graphs where it can and runs eagerly elsewhere."""

    def __init__(self, buckets: tuple[int, ...] = BUCKETS, warmup_steps: int = 2) -> None:
        self.buckets = buckets
        self.warmup_steps = warmup_steps
        # per UNet (by id, dropped when the UNet is freed), per shape key; None: capture failed, stay eager
        self._graphs: dict[int, dict[tuple[Any, ...], _Graph | None]] = {}
        self._pool: Any = None
        self._lock = threading.Lock()
        self.captures = 0
        self.replays = 0

    def __call__(
        self,
        unet: Any,
        sample: Any,
        timesteps: Any,
        hidden: Any,
        added: dict[str, Any] | None,
        shared: dict[str, Any] | None = None,
    ) -> Any:
        bucket = self._bucket(sample)
        if bucket is None:
            return eager_forward(unet, sample, timesteps, hidden, added, shared)
        key = (bucket, ForwardKey.of(unet, sample, hidden, added), _shapes(shared))
        with self._lock:
            graphs = self._graphs_of(unet)
            if key not in graphs:
                graphs[key] = self._capture(unet, bucket, sample, timesteps, hidden, added, shared)
            graph = graphs[key]
            if graph is None:
                return eager_forward(unet, sample, timesteps, hidden, added, shared)
            self.replays += 1
            return graph.run(sample, timesteps, hidden, added, shared)

    def _graphs_of(self, unet: Any) -> dict[tuple[Any, ...], _Graph | None]:
        """This UNet's graphs. They replay its weights' memory, so they go when the UNet goes (model eviction)."""
        if id(unet) not in self._graphs:
            self._graphs[id(unet)] = {}
            weakref.finalize(unet, self._graphs.pop, id(unet), None)
        return self._graphs[id(unet)]

    def _bucket(self, sample: Any) -> int | None:
        if sample.device.type != "cuda":
            return None
        return next((bucket for bucket in self.buckets if bucket >= sample.shape[0]), None)

    def _capture(
        self,
        unet: Any,
        bucket: int,
        sample: Any,
        timesteps: Any,
        hidden: Any,
        added: dict[str, Any] | None,
        shared: dict[str, Any] | None,
    ) -> _Graph | None:
        import torch

        static = _Graph(
            graph=torch.cuda.CUDAGraph(),
            sample=_padded(sample, bucket),
            timesteps=_padded(timesteps, bucket),
            hidden=_padded(hidden, bucket),
            added={name: _padded(value, bucket) for name, value in added.items()} if added else None,
            shared={name: value.clone() for name, value in shared.items()} if shared else None,
            output=None,
        )
        inputs = (static.sample, static.timesteps, static.hidden, static.added, static.shared)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):  # lazy inits and autotuning happen outside the capture
                    eager_forward(unet, *inputs)
            torch.cuda.current_stream().wait_stream(side)
            # thread_local: other requests' threads keep encoding prompts and decoding images meanwhile
            with torch.cuda.graph(static.graph, pool=self._pool, capture_error_mode="thread_local"):
                static.output = eager_forward(unet, *inputs)
        except Exception:
            log.warning("CUDA graph capture failed for %d rows of %s; running eagerly", bucket, tuple(sample.shape))
            log.debug("capture failure", exc_info=True)
            return None
        self._pool = static.graph.pool()
        self.captures += 1
        log.info("captured a CUDA graph for %d rows of %s", bucket, tuple(sample.shape[1:]))
        return static


def _shapes(shared: dict[str, Any] | None) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """The shapes of the inputs all rows share: a graph replays them at the shapes it was captured at. (Their
    values are copied in at each replay; which rows may share them is the ForwardKey's business.)"""
    return tuple(sorted((name, tuple(value.shape), str(value.dtype)) for name, value in (shared or {}).items()))


def _padded(tensor: Any, rows: int) -> Any:
    """A static buffer of `rows` rows holding `tensor` at the top (padding rows repeat its first row)."""
    import torch

    buffer = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    buffer[: tensor.shape[0]].copy_(tensor)
    buffer[tensor.shape[0] :].copy_(tensor[:1].expand(rows - tensor.shape[0], *tensor.shape[1:]))
    return buffer
