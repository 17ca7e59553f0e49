"""Model-store benchmark on this machine (CPU, tiny or synthetic data); prints one JSON object.

- archive: pack + unpack throughput (MB/s of model files) of a synthetic safetensors directory, streamed
  through zstd as the cloud cache does it;
- load: loading a local safetensors directory through the model store (ModelStore, what a server start or a
  model switch pays) against a bare `DiffusionPipeline.from_pretrained(...).to(device)` of the same directory, in
  a process that has already imported both (the page cache is warm for both alike); target: ratio <= 1.1.

Medians of several runs. Usage: python bench/archive_bench.py [--runs 5] [--megabytes 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def median_seconds(action: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def synthetic_model(directory: Path, megabytes: int) -> int:
    """A save_pretrained-like directory: random fp16 weights (which compress as little as real ones)."""
    import torch
    from safetensors.torch import save_file

    (directory / "unet").mkdir(parents=True)
    (directory / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(megabytes * 2**19, generator=generator).to(torch.float16)  # 2 bytes each
    save_file({"weight": weights}, str(directory / "unet" / "diffusion_pytorch_model.safetensors"))
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def archive_throughput(work: Path, megabytes: int, runs: int) -> dict[str, float]:
    from diffusers_api.models import archive

    source = work / "source"
    size = synthetic_model(source, megabytes)
    packed = work / "model.tar.zst"

    def pack() -> None:
        with packed.open("wb") as out:
            archive.pack(source, out)

    def unpack() -> None:
        target = work / f"unpacked-{time.perf_counter_ns()}"
        target.mkdir()
        with packed.open("rb") as stream:
            archive.unpack(stream, target)

    pack_s = median_seconds(pack, runs)
    unpack_s = median_seconds(unpack, runs)
    return {
        "model_mb": round(size / 1e6, 1),
        "archive_mb": round(packed.stat().st_size / 1e6, 1),
        "pack_mb_s": round(size / 1e6 / pack_s, 1),
        "unpack_mb_s": round(size / 1e6 / unpack_s, 1),
        "pack_plus_unpack_mb_s": round(size / 1e6 / (pack_s + unpack_s), 1),
    }


def load_ratio(work: Path, runs: int) -> dict[str, float]:
    from diffusers import DiffusionPipeline

    from diffusers_api.config import Settings
    from diffusers_api.models.builtin import ensure_builtin
    from diffusers_api.models.store import ModelStore

    directory = ensure_builtin("builtin/tiny-sd", work / "models")
    settings = Settings(models_dir=work / "models", model_id=str(directory), device="cpu")

    def bare() -> None:
        DiffusionPipeline.from_pretrained(directory).to("cpu")

    def store() -> None:
        ModelStore(settings).load_default()

    bare(), store()  # warm the page cache and imports for both alike
    bare_times, store_times = [], []
    for _ in range(runs):  # interleaved, so that drift on a shared machine hits both alike
        bare_times.append(median_seconds(bare, 1))
        store_times.append(median_seconds(store, 1))
    bare_s, store_s = statistics.median(bare_times), statistics.median(store_times)
    return {
        "bare_from_pretrained_ms": round(bare_s * 1000, 1),
        "model_store_ms": round(store_s * 1000, 1),
        "ratio": round(store_s / bare_s, 3),
        "target_ratio": 1.1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=256, help="size of the synthetic model")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {
            "machine": {"cpus": os.cpu_count()},
            "runs": args.runs,
            "archive": archive_throughput(work, args.megabytes, args.runs),
            "load": load_ratio(work, args.runs),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
