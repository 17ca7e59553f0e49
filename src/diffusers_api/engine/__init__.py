"""The GPU engine: the serial queue, and the batching engine whose requests share their UNet steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Engine, Health
from .batcher import StepBatcher
from .batching import BatchingEngine
from .graphs import CudaGraphForward
from .serial import SerialEngine

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["BatchingEngine", "CudaGraphForward", "Engine", "Health", "SerialEngine", "StepBatcher", "make_engine"]


def make_engine(settings: Settings) -> Engine:
    """The engine for `settings`: batching, or serial when MAX_BATCH_SIZE is 1. Used by every transport."""
    from ..runner import Runner

    runner = Runner(settings)
    if settings.max_batch_size == 1:
        return SerialEngine(runner, max_queue=settings.max_queue)
    # CudaGraphForward runs eagerly off CUDA, so the same engine serves CPUs and GPUs
    batcher = StepBatcher(
        forward=CudaGraphForward() if settings.cuda_graphs else None, max_wait_s=settings.batch_wait_ms / 1000
    )
    return BatchingEngine(runner, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue, batcher=batcher)
