"""The GPU engine: queue and worker now; the batcher, denoising loop and CUDA graphs build on this seam."""

from .base import Engine, Health
from .serial import SerialEngine

__all__ = ["Engine", "Health", "SerialEngine"]
