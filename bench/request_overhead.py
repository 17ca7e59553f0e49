"""Host time a request spends outside the denoising loop: the Python its own thread runs (CPU, tiny model).

    python bench/request_overhead.py                                   # this tree
    python bench/request_overhead.py --baseline-src /tmp/before/src    # and another tree, alternately

Requests go one at a time through the Runner with the batched loop, as the batching engine runs them. The
request thread's CPU time (`time.thread_time`) counts only what that thread runs: building the request's
pipeline, preparing it (checks, prompt encoding, timesteps, initial latents), then decoding, post-processing and
encoding the image. The denoising loop runs on its own thread and is not counted. On a GPU these steps launch
small kernels and run Python with the GIL held, so concurrent requests serialise on them: in the H100 runs, 8
clients in step took about 0.5 s per round trip more than their 20 batched steps.

With `--clients N`, it measures what that host work costs N concurrent clients when the device is fast: the UNet
forward becomes a sleep of `--device-ms` (the GIL released, as while a GPU runs a CUDA graph) whatever its rows,
torch runs on one thread, and N closed-loop clients send `--per-client` requests each. It reports images/s. A
simulation of a host-bound GPU server, not a GPU measurement.

Each variant runs in a fresh interpreter; variants alternate, and each reports the median over its requests.
One JSON line per variant and run is appended to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh interpreter whose sys.path starts with the variant's src/."""
    import torch

    from diffusers_api.config import Settings
    from diffusers_api.denoising import Rendezvous, SharedSteps
    from diffusers_api.runner import Runner
    from diffusers_api.schema import GenerateRequest

    steps = args.steps

    def device_step(unet: Any, sample: Any, timesteps: Any, hidden: Any, added: Any, shared: Any = None) -> Any:
        time.sleep(args.device_ms / 1000)
        return torch.zeros_like(sample)

    if args.clients > 1:
        torch.set_num_threads(1)
        batcher = Rendezvous(forward=device_step)
    else:
        batcher = Rendezvous()
    settings = Settings(model_id="builtin/tiny-sd", models_dir=Path(tempfile.mkdtemp(prefix="overhead-")))
    runner = Runner(settings, steps=SharedSteps(batcher))
    runner.start()

    def request(i: int) -> GenerateRequest:
        return GenerateRequest(
            prompt=f"a photograph of an astronaut riding a horse {i}",
            seed=i,
            num_inference_steps=steps,
            scheduler="DPM++ 2M",
            safety_checker=False,  # as the GPU benchmark's models, which have none
            image_format="JPEG",
        )

    for i in range(3):  # warm-up
        runner.run(request(i))
    if args.clients > 1:
        return _clients(runner, request, args)
    cpu_ms, wall_ms = [], []
    for i in range(args.requests):
        cpu, wall = time.thread_time(), time.perf_counter()
        runner.run(request(i))
        cpu_ms.append((time.thread_time() - cpu) * 1000)
        wall_ms.append((time.perf_counter() - wall) * 1000)
    runner.steps.stop()
    return {
        "request_thread_cpu_ms": round(statistics.median(cpu_ms), 2),
        "wall_ms": round(statistics.median(wall_ms), 1),
    }


def _clients(runner: Any, request: Any, args: argparse.Namespace) -> dict[str, Any]:
    def client(index: int) -> None:
        for n in range(args.per_client):
            runner.run(request(1000 * index + n))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    runner.steps.stop()
    stats = runner.steps.rendezvous.stats
    return {
        "clients": args.clients,
        "device_ms": args.device_ms,
        "images_per_s": round(args.clients * args.per_client / wall, 3),
        "mean_rows": round(stats.rows_total / stats.forwards, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="fresh interpreters per variant")
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src/, measured alternately")
    parser.add_argument("--out", type=Path, default=Path("bench/results/request_overhead-cpu.jsonl"))
    parser.add_argument("--clients", type=int, default=1, help="N > 1: images/s of N clients, simulated device")
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--device-ms", type=float, default=40.0, help="the simulated device's time per UNet step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import diffusers
        import torch

        versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0]}
        print(json.dumps(child(args) | {"env": versions}))
        return
    variants = {"current": ROOT / "src"}
    if args.baseline_src:
        variants["baseline"] = args.baseline_src.resolve()
    results: dict[str, list[float]] = {name: [] for name in variants}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in range(args.runs):
        for name in variants if run % 2 == 0 else reversed(variants):
            env = os.environ | {"PYTHONPATH": f"{variants[name]}:{os.environ.get('PYTHONPATH', '')}", "OFFLINE": "1"}
            command = [sys.executable, __file__, "--child", *sys.argv[1:]]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            record = json.loads(done.stdout.strip().splitlines()[-1]) | {"variant": name, "run": run}
            record |= {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "what": "request_overhead"}
            results[name].append(record["images_per_s" if args.clients > 1 else "request_thread_cpu_ms"])
            print(json.dumps(record), flush=True)
            with args.out.open("a") as out:
                out.write(json.dumps(record) + "\n")
    summary = {name: round(statistics.median(values), 2) for name, values in results.items()}
    if "baseline" in summary:
        summary["baseline_over_current"] = round(summary["baseline"] / summary["current"], 2)
    measure = "images_per_s" if args.clients > 1 else "request_thread_cpu_ms"
    print(json.dumps({"what": "request_overhead_summary", f"median_{measure}": summary}))


if __name__ == "__main__":
    main()
