"""What a model weighs: on the device (its modules' tensors) and, before loading, from its weight files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def pipeline_bytes(pipe: Any) -> int:
    """Bytes of the parameters and buffers of a pipeline's torch modules (each tensor counted once)."""
    return module_bytes(*pipe.components.values())


def module_bytes(*modules: Any) -> int:
    """Bytes of the parameters and buffers of the torch modules among `modules` (each tensor counted once)."""
    import torch

    seen: set[int] = set()
    total = 0
    for component in modules:
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F64", "F32", "F16", "BF16")


def estimate_bytes(directory: Path, precision: str = "") -> int:
    """What loading `directory` in `precision` will take, from its weight files, before loading anything.

    safetensors headers give every tensor's dtype and shape (floats are counted in the target precision);
    other weight files count by size. Files of every variant present are counted (an overestimate)."""
    target = {"fp16": 2, "bf16": 2, "fp32": 4}.get(precision)
    total = 0
    for path in directory.rglob("*"):
        if path.suffix == ".safetensors" and path.is_file():
            total += _safetensors_bytes(path, target)
        elif path.suffix in WEIGHT_SUFFIXES and path.is_file():
            total += path.stat().st_size
    return total


def _safetensors_bytes(path: Path, float_bytes: int | None) -> int:
    with path.open("rb") as source:
        header = json.loads(source.read(int.from_bytes(source.read(8), "little")))
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        size = float_bytes if float_bytes and tensor["dtype"] in _FLOATS else _DTYPE_BYTES.get(tensor["dtype"], 4)
        total += math.prod(tensor["shape"]) * size
    return total
