"""CPU benchmark on the built-in tiny SD model: what batching buys, and what the server costs.

    python bench/cpu_batching.py --out bench/results/cpu.jsonl

1. Throughput of 8 concurrent clients over 1 client through the batching engine (ratio; target >= 3x), with
   every batched image checked against its sequential counterpart (same request, same seed) within the bound
   the tests assert: at most one 8-bit level, on at most 1% of pixels.
2. Server overhead per request: `diffusers-api serve` over real HTTP against a direct pipeline call of the
   same request (ratio of medians).

On a CPU only ratios mean anything (PERFORMANCE.md); each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from diffusers_api.config import Settings  # noqa: E402
from diffusers_api.denoising import SharedSteps  # noqa: E402
from diffusers_api.engine import BatchingEngine  # noqa: E402
from diffusers_api.generation import Generation  # noqa: E402
from diffusers_api.runner import Runner  # noqa: E402
from diffusers_api.schema import GenerateRequest, GenerateResult  # noqa: E402

MODEL = "builtin/tiny-sd"


def requests(count: int, steps: int, size: int | None = None) -> list[GenerateRequest]:
    return [
        GenerateRequest(prompt=f"a red barn, take {i}", seed=i, num_inference_steps=steps, width=size, height=size)
        for i in range(count)
    ]


async def through_engine(engine: BatchingEngine, batch: list[GenerateRequest], clients: int) -> tuple[float, list]:
    """`clients` closed-loop clients share the requests; returns (seconds, results in request order)."""
    results: list[GenerateResult | None] = [None] * len(batch)
    queue = list(enumerate(batch))

    async def client() -> None:
        while queue:
            index, request = queue.pop(0)
            results[index] = await engine.submit(Generation(request))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started, results


def pixels(result: GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)


def throughput(models_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(model_id=MODEL, models_dir=models_dir, max_batch_size=8)
    steps = SharedSteps()
    engine = BatchingEngine(Runner(settings, steps=steps), max_batch_size=8, max_queue=64)
    batch = requests(args.requests, args.steps, args.size)

    async def main() -> dict[str, Any]:
        await engine.start()
        await through_engine(engine, batch[:2], 1)  # warm-up
        ones, eights, rows = [], [], []
        stats = steps.rendezvous.stats
        for _ in range(args.repeats):
            seconds, sequential = await through_engine(engine, batch, 1)
            ones.append(len(batch) / seconds)
            forwards, rows_total = stats.forwards, stats.rows_total
            seconds, batched = await through_engine(engine, batch, 8)
            eights.append(len(batch) / seconds)
            rows.append((stats.rows_total - rows_total) / (stats.forwards - forwards))
        differences = [np.abs(pixels(b) - pixels(s)) for b, s in zip(batched, sequential, strict=True)]
        await engine.stop()
        return {
            "what": "cpu_batching_8_clients_over_1",
            "size": args.size or "model default",
            "images_per_s_1_client": round(statistics.median(ones), 2),
            "images_per_s_8_clients": round(statistics.median(eights), 2),
            "ratio": round(statistics.median(eights) / statistics.median(ones), 2),
            "max_level_difference": int(max(d.max() for d in differences)),
            "max_differing_share": round(float(max((d > 0).mean() for d in differences)), 5),
            "mean_rows_per_forward_8_clients": round(statistics.median(rows), 2),  # CFG: 2 rows an image
        }

    return asyncio.run(main())


def overhead(models_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import torch
    from diffusers import DiffusionPipeline

    from diffusers_api.models.builtin import ensure_builtin
    from gpu_bench import Server

    path = ensure_builtin(MODEL, models_dir)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    body = {"prompt": "a red barn", "num_inference_steps": args.steps, "seed": 1}

    def direct() -> None:
        pipe("a red barn", num_inference_steps=args.steps, generator=torch.Generator().manual_seed(1))

    server_args = argparse.Namespace(work=models_dir.parent, device="cpu")
    server = Server(path, server_args, models_dir.parent / "server.log", {"MAX_BATCH_SIZE": "8"})
    try:
        server.wait_ready()
        httpx.post(f"{server.url}/v1/generate", json=body, timeout=120).raise_for_status()  # warm-up
        direct()
        direct_s, server_s = [], []
        for _ in range(args.repeats * 3):
            started = time.perf_counter()
            direct()
            direct_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            httpx.post(f"{server.url}/v1/generate", json=body, timeout=120).raise_for_status()
            server_s.append(time.perf_counter() - started)
    finally:
        server.stop()
    return {
        "what": "cpu_server_overhead",
        "direct_pipeline_s": round(statistics.median(direct_s), 4),
        "server_http_s": round(statistics.median(server_s), 4),
        "ratio": round(statistics.median(server_s) / statistics.median(direct_s), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu.jsonl"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, help="image width and height (default: the model's, 128)")
    parser.add_argument("--skip-overhead", action="store_true", help="measure the batching ratio only")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    with tempfile.TemporaryDirectory() as work:
        models_dir = Path(work) / "models"
        for measure in (throughput,) if args.skip_overhead else (throughput, overhead):
            record = measure(models_dir, args) | {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
            line = json.dumps(record)
            print(line, flush=True)
            with args.out.open("a") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
