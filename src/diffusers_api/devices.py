"""The device, as every layer asks about it: memory in use, and which errors mean what.

Nothing here initialises CUDA or imports torch on its own account: a health probe must not touch a device the
model has not, and must not wait on an import the engine's thread is in the middle of.
"""

from __future__ import annotations

import gc
import re
import sys

# Messages of errors after which the CUDA context is poisoned and every later request would fail: the process
# must be replaced. (Out-of-memory is not among them: PyTorch frees the memory and the next request runs.)
_FATAL_DEVICE_ERRORS = re.compile(
    r"CUDA error|CUBLAS_STATUS_|CUDNN_STATUS_|device-side assert|illegal memory access|NCCL error", re.IGNORECASE
)


def device_memory() -> dict[str, float] | None:
    """GPU memory held by this process's tensors, now and at its peak (GB); None where CUDA is not in use."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {
        "allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 3),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "reserved_gb": round(torch.cuda.memory_reserved() / 1e9, 3),
    }


def memory_usage(device: str) -> float:
    """Fraction of device memory in use (0..1); 0 on CPU."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / total, 4)


def is_out_of_memory(error: BaseException) -> bool:
    """True when `error` says the device (or, on a CPU, the host) ran out of memory."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()  # other devices' allocators (CPU, MPS) say it in words
    return "out of memory" in text or "can't allocate memory" in text


def is_fatal_device_error(error: BaseException) -> bool:
    """True when `error`, or an error it was raised from, left the GPU unusable."""
    seen: BaseException | None = error
    while seen is not None:
        if _FATAL_DEVICE_ERRORS.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def resolve_device(name: str) -> str:
    """DEVICE (`auto`: CUDA, else Apple's MPS, else the CPU) as torch names it."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def free_device_memory() -> None:
    """Collect what the dropped references held, and hand cached CUDA blocks back to the driver."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
