"""Above the runner: admission and lifecycle. The serial engine runs one request at a time; the batching engine
admits many at once and gives the runner shared steps (denoising.SharedSteps), so their steps are batched."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .base import BaseEngine, Engine, Health
from .batching import BatchingEngine
from .serial import SerialEngine

if TYPE_CHECKING:
    from ..config import Settings
    from ..denoising.forward import UNetForward

log = logging.getLogger(__name__)

__all__ = ["BaseEngine", "BatchingEngine", "Engine", "Health", "SerialEngine", "make_engine"]


def make_engine(settings: Settings) -> Engine:
    """The engine for `settings`: batching, or serial when MAX_BATCH_SIZE is 1. Used by every transport."""
    from ..denoising import SharedSteps
    from ..runner import Runner

    if settings.max_batch_size == 1:
        if settings.compile:
            log.warning("COMPILE applies to the batching engine's steps; MAX_BATCH_SIZE=1 runs without it")
        return SerialEngine(Runner(settings), max_queue=settings.max_queue)
    steps = SharedSteps.with_forward(
        _unet_forward(settings),
        max_wait_s=settings.batch_wait_ms / 1000,
        decode_batch_max=settings.decode_batch_max,
        encode_batch_max=settings.encode_batch_max,
    )
    runner = Runner(settings, steps=steps)
    return BatchingEngine(runner, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)


def _unet_forward(settings: Settings) -> UNetForward | None:
    """How batched UNet and transformer steps run: eagerly, as CUDA graphs, compiled in the background, or both."""
    from ..denoising.graphs import CudaGraphForward

    # CudaGraphForward runs eagerly off CUDA, so the same engine serves CPUs and GPUs
    forward = CudaGraphForward() if settings.cuda_graphs else None
    if not settings.compile:
        return forward
    from ..denoising.compiled import CompiledForward, use_cache_dir

    use_cache_dir(settings.compile_cache_dir or settings.models_dir / "torch-compile")
    return CompiledForward(forward, mode=settings.compile_mode)
