"""torch.compile of the UNet through CompiledForward: cold and warm-cache compile times, step times, accuracy.

    python bench/compile_bench.py --out bench/results/compile-cpu.jsonl                  # CPU, tiny SD UNet
    python bench/compile_bench.py --model sd21 --out bench/results/compile-gpu.jsonl     # CUDA, full-size SD2.1

Each measurement runs in a fresh process (a child of this script), as a server restart would:

1. cold: an empty compile cache. The UNet's first step queues its compile (which runs in a compiling process,
   then loads in the server's); eager steps go on meanwhile, and their latency is measured (the compile competes
   for the cores and the GIL). Reported: seconds from the first step to the compiled path being ready, what each
   further batch size cost (new graphs, seconds), then for every batch size eager and compiled step times
   (medians, measured alternately) and the largest difference between compiled and eager outputs.
2. warm: the same in a new process with the cache the cold run left (inductor's FX graph and AOTAutograd caches
   hit, no compiling process; dynamo still traces in the server's process).

Results are JSON lines (printed and appended to --out) with the torch, diffusers and GPU versions.

On CUDA the base forward is CudaGraphForward, so the step times compare the eager step replayed as a CUDA graph
with the compiled step replayed as a CUDA graph. On a CPU only ratios mean anything (PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from diffusers_api.denoising.compiled import CompiledForward, use_cache_dir  # noqa: E402
from diffusers_api.denoising.forward import eager_forward  # noqa: E402
from diffusers_api.denoising.graphs import CudaGraphForward  # noqa: E402

MODELS = {"tiny-sd": "builtin/tiny-sd", "tiny-sdxl": "builtin/tiny-sdxl", "sd21": "sd21", "sdxl": "sdxl"}


# --- the child: one process, one compile --------------------------------------------------------------------


def build_unet(model: str, device: str, dtype: torch.dtype) -> Any:
    if model.startswith("tiny-"):
        from diffusers_api.models.builtin import build_builtin

        return build_builtin(MODELS[model]).unet.to(device, dtype).eval()
    from gpu_bench import sd21_base, sdxl_base

    pipe = (sd21_base if model == "sd21" else sdxl_base)(False, device, dtype)
    if device == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)  # as the server runs it
    return pipe.unet.eval()


def step_inputs(unet: Any, rows: int, latent: int, seed: int = 0) -> tuple[Any, Any, Any, dict[str, Any] | None]:
    config, param = unet.config, next(unet.parameters())
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(param.device, param.dtype)

    sample = randn(rows, config.in_channels, latent, latent)
    timesteps = torch.linspace(999, 1, rows, device=param.device)
    hidden = randn(rows, 77, config.cross_attention_dim)
    added = None
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": randn(rows, text), "time_ids": randn(rows, 6)}
    return sample, timesteps, hidden, added


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_times(forward: Any, base: Any, unet: Any, args: tuple[Any, ...], runs: int) -> dict[str, float]:
    """Median step times of `base` (eager, or eager graphs) and `forward` (compiled), measured alternately so
    that a change in the machine's load affects both alike."""
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(runs):
        for name, run in (("eager", base), ("compiled", forward)):
            started = time.perf_counter()
            run(unet, *args)
            sync()
            times[name].append(time.perf_counter() - started)
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    speedup = round(eager / compiled, 3)
    return {"eager_step_s": round(eager, 5), "compiled_step_s": round(compiled, 5), "speedup": speedup}


def alone(base: Any, unet: Any, args: tuple[Any, ...], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        base(unet, *args)
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def until_ready(forward: CompiledForward, unet: Any, args: tuple[Any, ...]) -> tuple[float, list[float]]:
    """Run steps (eager while compiling) from the first one until the compile is done; (seconds, step times)."""
    started, steps = time.perf_counter(), []
    forward(unet, *args)  # queues the compile
    done = threading.Event()
    threading.Thread(target=lambda: (forward.wait(), done.set()), daemon=True).start()
    while not done.is_set():
        begun = time.perf_counter()
        forward(unet, *args)
        sync()
        steps.append(time.perf_counter() - begun)
        done.wait(0.05)  # requests do not arrive back to back either
    return time.perf_counter() - started, steps


def child(args: argparse.Namespace) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    use_cache_dir(args.cache_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU, spinning thread pools make step times erratic
    dtype = torch.float16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    unet = build_unet(args.model, device, dtype)
    latent = args.latent or unet.config.sample_size
    record: dict[str, Any] = {"build_s": round(time.perf_counter() - started, 2), "latent": latent}
    record["torch_threads"] = torch.get_num_threads()
    base = CudaGraphForward() if device == "cuda" else eager_forward
    forward = CompiledForward(base, backend="inductor", mode=args.mode)
    rows = [int(r) for r in args.rows.split(",")]
    with torch.no_grad():
        first = step_inputs(unet, rows[0], latent)
        alone(base, unet, first, 3)  # warm-up (and the eager graph's capture on CUDA)
        record["eager_step_alone_s"] = round(alone(base, unet, first, args.runs), 5)
        ready_s, during = until_ready(forward, unet, first)
        record |= {"rows": rows[0], "ready_s": round(ready_s, 2), "graphs": forward.stats.graphs}
        record["eager_steps_during_compile"] = len(during)
        record["eager_step_during_compile_s"] = round(statistics.median(during[1:]), 5) if len(during) > 1 else None
        record["more_rows"] = [more_rows(forward, unet, count, latent) for count in rows[1:]]
        record["steps"] = []
        for count in rows:  # every shape is compiled by now
            inputs = step_inputs(unet, count, latent, seed=count)
            forward(unet, *inputs)  # captures the compiled graph on CUDA
            eager = base(unet, *inputs)
            difference = float((forward(unet, *inputs) - eager).abs().max())
            timing = step_times(forward, base, unet, inputs, args.runs)
            record["steps"].append({"rows": count, **timing, "max_abs_difference": difference})
        record["max_abs_eager_output"] = float(base(unet, *first).abs().max())
    record["state"] = forward.summary()
    record["cache"] = {key: dict(counters[key]) for key in ("inductor", "aot_autograd") if counters[key]}
    return record


def more_rows(forward: CompiledForward, unet: Any, rows: int, latent: int) -> dict[str, Any]:
    """A further batch size: did it need a new graph, and how long until it ran compiled."""
    graphs, args = forward.stats.graphs, step_inputs(unet, rows, latent, seed=rows)
    ready_s, _ = until_ready(forward, unet, args)
    compiled_before = forward.stats.compiled_steps
    forward(unet, *args)
    return {
        "rows": rows,
        "new_graphs": forward.stats.graphs - graphs,
        "ready_s": round(ready_s, 2),
        "compiled": forward.stats.compiled_steps > compiled_before,
    }


# --- the parent ----------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, what: str, cache_dir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", "--cache-dir", str(cache_dir), "--model", args.model]
    command += ["--mode", args.mode, "--rows", args.rows if what == "cold" else args.rows.split(",")[0]]
    command += ["--runs", str(args.runs), "--threads", str(args.threads), "--latent", str(args.latent)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    record: dict[str, Any] = {"what": f"compile_{what}", "model": args.model, "mode": args.mode}
    record["process_s"] = round(time.perf_counter() - started, 1)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return record | {"error": f"exit {done.returncode}", "stderr": done.stderr[-3000:]}
    return record | json.loads(lines[-1])


def environment() -> dict[str, Any]:
    import os

    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0]}
    info["cpus"] = os.cpu_count()
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (cpu)"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny-sd")
    parser.add_argument("--mode", default="default", help="inductor mode (default, max-autotune-no-cudagraphs)")
    parser.add_argument("--rows", default="2,3,8,16,1", help="batch sizes; the first is compiled cold and warm")
    parser.add_argument("--latent", type=int, default=0, help="latent size (default: the UNet's sample_size)")
    parser.add_argument("--runs", type=int, default=20, help="steps per step-time median")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/compile.jsonl"))
    parser.add_argument("--cache-dir", type=Path, help="compile cache (default: a new temporary directory)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="compile-bench-"))
    env = environment() | {"date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for what in ("cold", "warm"):
        record = run_child(args, what, cache_dir) | {"env": env}
        print(json.dumps(record), flush=True)
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
