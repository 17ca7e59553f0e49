"""The GPU engine: the serial queue, and the batching engine whose requests share their UNet steps."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .base import Engine, Health
from .batcher import StepBatcher
from .batching import BatchingEngine
from .graphs import CudaGraphForward
from .serial import SerialEngine

if TYPE_CHECKING:
    from ..config import Settings
    from .batcher import UNetForward

log = logging.getLogger(__name__)

__all__ = ["BatchingEngine", "CudaGraphForward", "Engine", "Health", "SerialEngine", "StepBatcher", "make_engine"]


def make_engine(settings: Settings) -> Engine:
    """The engine for `settings`: batching, or serial when MAX_BATCH_SIZE is 1. Used by every transport."""
    from ..runner import Runner

    runner = Runner(settings)
    if settings.max_batch_size == 1:
        if settings.compile:
            log.warning("COMPILE applies to the batching engine's UNet steps; MAX_BATCH_SIZE=1 runs without it")
        return SerialEngine(runner, max_queue=settings.max_queue)
    batcher = StepBatcher(forward=_unet_forward(settings), max_wait_s=settings.batch_wait_ms / 1000)
    return BatchingEngine(runner, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue, batcher=batcher)


def _unet_forward(settings: Settings) -> UNetForward | None:
    """How batched UNet steps run: eagerly, as CUDA graphs, compiled in the background, or both."""
    # CudaGraphForward runs eagerly off CUDA, so the same engine serves CPUs and GPUs
    forward = CudaGraphForward() if settings.cuda_graphs else None
    if not settings.compile:
        return forward
    from .compiled import CompiledForward, use_cache_dir

    use_cache_dir(settings.compile_cache_dir or settings.models_dir / "torch-compile")
    return CompiledForward(forward, mode=settings.compile_mode)
