"""GPU benchmark: plain diffusers against the diffusers-api server, in one run, on full-size random weights.

    python bench/gpu_bench.py --out bench/results/gpu.jsonl            # on a CUDA machine
    python bench/gpu_bench.py --tiny --out /tmp/tiny.jsonl             # the same script on a CPU, tiny models

Workload W (../shared/PERFORMANCE.md): SD2.1-base architecture, 512x512, 20 steps DPM-Solver++ 2M, guidance
7.5, fp16, one image per request; then SDXL at 1024x1024. Weights are random (built on the GPU, saved with
save_pretrained): speed does not depend on their values. Measured, each in this run:

- plain diffusers, in process: W latency (p50 of several calls), 8 images in one call, peak memory, load time;
- the server (`diffusers-api serve` in a subprocess, real HTTP): cold start (process start to first image),
  single-request latency, throughput and p50/p99 latency with 1, 8 and 32 concurrent clients, peak memory;
- with `--variant LABEL:NAME=VALUE,...`, W again on a server with those settings, e.g.
  `--variant compiled:COMPILE=1`: from an empty compile cache, each run waiting for the compiles its warm-up
  queued (at most --compile-wait-s in all), with the compile summary from /health per run;
- SDXL 1024: plain and server latency.

Each result is one JSON line (printed and appended to --out) with the GPU, torch and diffusers versions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

PROMPT = "a photograph of an astronaut riding a horse"


# --- building models with random weights ----------------------------------------------------------------------


def sd21_base(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_api.models.builtin import build_clip_tokenizer

    if tiny:
        from diffusers_api.models.builtin import build_builtin

        return build_builtin("builtin/tiny-sd").to(device, dtype)
    tokenizer = build_clip_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
        vae = _vae(0.18215)
        text_encoder = CLIPTextModel(_text_config(CLIPTextConfig, tokenizer, 1024, 23, 16, 4096, 512, "gelu"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler(**_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, dtype)


def sdxl_base(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusers_api.models.builtin import build_clip_tokenizer

    if tiny:
        from diffusers_api.models.builtin import build_builtin

        return build_builtin("builtin/tiny-sdxl").to(device, dtype)
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = _vae(0.13025)
        text_encoder = CLIPTextModel(_text_config(CLIPTextConfig, tokenizer, 768, 12, 12, 3072, 768, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(CLIPTextConfig, tokenizer_2, 1280, 32, 20, 5120, 1280, "gelu")
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler(**_scheduler_config()),
    ).to(device, dtype)


def _vae(scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=scaling_factor,
        force_upcast=False,  # as with the fp16-safe VAEs production SDXL images use
    )


def _text_config(
    config_cls: Any, tokenizer: Any, hidden: int, layers: int, heads: int, ffn: int, proj: int, act: str
) -> Any:
    return config_cls(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=proj,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _scheduler_config() -> dict[str, Any]:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "steps_offset": 1,
    }


# --- measuring -------------------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def plain_diffusers(path: Path, args: argparse.Namespace, size: int, label: str) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    started = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype).to(args.device)
    sync()
    load_s = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)

    def call(images: int = 1) -> Any:
        return pipe(
            PROMPT,
            num_inference_steps=args.steps,
            height=size,
            width=size,
            guidance_scale=7.5,
            num_images_per_prompt=images,
            generator=torch.Generator("cpu").manual_seed(0),
        )

    timed(call, 2)  # warm-up: cuDNN autotuning, lazy inits
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    latencies = timed(call, args.runs)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    result = {
        "what": f"plain_diffusers_{label}",
        "load_s": round(load_s, 3),
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latencies_s": [round(t, 4) for t in latencies],
        "peak_memory_gb": round(peak / 1e9, 3),
    }
    if label == "W":
        batch8 = timed(lambda: call(8), max(2, args.runs // 3))
        result["batch8_call_s"] = round(statistics.median(batch8), 4)
        result["batch8_images_per_s"] = round(8 / statistics.median(batch8), 2)
        # a plain pipeline behind a server serves one request at a time: its throughput is 1 / latency
        result["serial_images_per_s"] = round(1 / result["latency_p50_s"], 2)
    return result


class Server:
    """`diffusers-api serve` in a subprocess, as a user starts it."""

    def __init__(
        self,
        path: Path,
        args: argparse.Namespace,
        log: Path,
        extra_env: dict[str, str],
        src: Path = ROOT / "src",
        switch_interval_ms: float | None = None,
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"PYTHONPATH": f"{src}:{os.environ.get('PYTHONPATH', '')}"} | extra_env
        # With switch_interval_ms, Python's GIL switch interval (default 5 ms) is set before the server starts.
        start = ["-m", "diffusers_api"]
        if switch_interval_ms is not None:
            start = ["-c", _SWITCHED.format(seconds=switch_interval_ms / 1000)]
        command = [
            sys.executable,
            *start,
            "serve",
            "--model",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--models-dir",
            str(args.work / "store"),
        ]
        if args.device == "cuda":
            command += ["--precision", "fp16"]
        self.started = time.perf_counter()
        self.log = log.open("ab")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server not ready")

    def gpu_memory_gb(self) -> float:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 0.0
        for line in out.splitlines():
            pid, _, used = line.partition(",")
            if pid.strip() == str(self.process.pid):
                return round(float(used) / 1024, 3)
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


_SWITCHED = (
    "import runpy, sys; sys.setswitchinterval({seconds}); sys.argv = ['diffusers_api', *sys.argv[1:]]; "
    "runpy.run_module('diffusers_api', run_name='__main__', alter_sys=True)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def request_body(args: argparse.Namespace, size: int, seed: int) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "num_inference_steps": args.steps,
        "width": size,
        "height": size,
        "guidance_scale": 7.5,
        "seed": seed,
        "scheduler": "DPM++ 2M",
        "image_format": args.image_format,
    }


async def load(url: str, args: argparse.Namespace, size: int, clients: int, per_client: int) -> dict[str, Any]:
    """Closed loop: `clients` clients, each sending `per_client` requests one after the other."""
    import httpx

    latencies: list[float] = []

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for n in range(per_client):
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/generate", json=request_body(args, size, index * 1000 + n))
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        before = (await http.get(f"{url}/health")).json().get("batching", {})
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - started
        health = (await http.get(f"{url}/health")).json()
        after = health.get("batching", {})
    return {
        "batching": _batching_delta(before, after),
        "loop": after.get("loop"),
        # torch's peak allocation so far: after the 1-client run it is the peak at batch 1
        "device_memory": health.get("device_memory"),
        **({"compile": health["compile"]} if health.get("compile", {}).get("state", "off") != "off" else {}),
        "clients": clients,
        "requests": len(latencies),
        "images_per_s": round(len(latencies) / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p99_s": round(percentile(latencies, 0.99), 4),
    }


def _batching_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    delta = {k: after[k] - before.get(k, 0) for k in ("rounds", "forwards", "timeouts", "rows_total") if k in after}
    if delta.get("forwards"):
        delta["mean_rows"] = round(delta["rows_total"] / delta["forwards"], 2)
    return delta


def wait_compiled(url: str, deadline: float) -> dict[str, Any]:
    """Poll /health until no compile is queued or running (COMPILE=1) or time.monotonic() passes `deadline`;
    how long that took, and the summary."""
    import httpx

    started = time.perf_counter()
    while True:
        summary = httpx.get(f"{url}/health", timeout=10).json().get("compile", {})
        if summary.get("state") in ("ready", "failed", "off") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {"waited_s": round(time.perf_counter() - started, 1), "summary": summary}


def server_runs(
    path: Path,
    args: argparse.Namespace,
    size: int,
    label: str,
    concurrency: list[int],
    wait_ms: int = 250,
    src: Path = ROOT / "src",
    switch_interval_ms: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    import httpx

    env = {"MAX_BATCH_SIZE": str(args.max_batch), "BATCH_WAIT_MS": str(wait_ms)} | (extra_env or {})
    compiling = env.get("COMPILE") == "1"
    server = Server(path, args, args.out_dir / f"server_{label}.log", env, src, switch_interval_ms)
    try:
        server.wait_ready()
        response = httpx.post(f"{server.url}/v1/generate", json=request_body(args, size, 1), timeout=600)
        response.raise_for_status()
        result: dict[str, Any] = {
            "what": f"server_{label}",
            "batch_wait_ms": int(env["BATCH_WAIT_MS"]),  # a variant may set its own
            **({"environment": extra_env} if extra_env else {}),
            "cold_start_to_first_image_s": round(time.perf_counter() - server.started, 3),
            "first_request_timings_ms": response.json()["timings"],
        }
        result["runs"] = []
        deadline = time.monotonic() + args.compile_wait_s  # for all of this server's compile waits together
        if compiling:  # the first request queued the compile of its shape: measure once it is ready
            result["compile_ready"] = [wait_compiled(server.url, deadline)]
        for clients in concurrency:  # in increasing order, so that each run's peak memory is its own
            asyncio.run(load(server.url, args, size, clients, 1))  # warm-up: captures this batch's CUDA graphs
            if compiling:  # and queues a compile (or a check) of any new shape
                result["compile_ready"].append(wait_compiled(server.url, deadline) | {"clients": clients})
            per_client = args.runs if clients == 1 else max(2, args.per_client)
            result["runs"].append(asyncio.run(load(server.url, args, size, clients, per_client)))
        result["gpu_memory_gb"] = server.gpu_memory_gb()
        return result
    finally:
        server.stop()


def environment() -> dict[str, Any]:
    import diffusers

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    else:
        info["gpu"] = "none (cpu)"
    return info


def emit(record: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> None:
    line = json.dumps(record | {"env": env, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(line, flush=True)
    with args.out.open("a") as out:
        out.write(line + "\n")


def section(name: str, fn: Callable[[], dict[str, Any]], args: argparse.Namespace, env: dict[str, Any]) -> None:
    started = time.perf_counter()
    try:
        record = fn()
    except Exception as exc:  # one broken section must not lose the others' numbers
        record = {"what": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    record["section_s"] = round(time.perf_counter() - started, 1)
    emit(record, args, env)


def free_memory() -> None:
    """Give the GPU back before the server process starts (the plain pipeline went out of scope)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_and_save(builder: Callable[..., Any], path: Path, args: argparse.Namespace) -> dict[str, Any]:
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    started = time.perf_counter()
    pipe = builder(args.tiny, args.device, dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "what": f"build_{path.name}",
        "build_and_save_s": round(time.perf_counter() - started, 2),
        "gb": round(size / 1e9, 3),
    }


def variant(text: str) -> tuple[str, dict[str, str]]:
    """--variant LABEL:NAME=VALUE,...: a label and the settings for the server's environment."""
    label, _, settings = text.partition(":")
    items = [item for item in settings.split(",") if item]
    if not label or any("=" not in item for item in items):
        raise argparse.ArgumentTypeError(f"expected LABEL:NAME=VALUE,... (got {text!r})")
    return label, dict(item.split("=", 1) for item in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU check of the script itself)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.jsonl"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--per-client", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--image-format", default="JPEG")
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        help="also run W with Python's GIL switch interval set to this (the default is 5 ms)",
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="another checkout's src/ (e.g. from `git archive`): its server runs W too, after this one's",
    )
    parser.add_argument(
        "--variant",
        action="append",
        type=variant,
        default=[],
        metavar="LABEL:NAME=VALUE,...",
        help="also run W with these settings in the server's environment, e.g. graphs-off:CUDA_GRAPHS=0 or "
        "compiled:COMPILE=1 (which waits for each new shape's compile before measuring; cold cache)",
    )
    parser.add_argument("--variant-clients", default="", help="clients for the variants (default: --clients)")
    parser.add_argument(
        "--compile-wait-s", type=float, default=240, help="longest wait for a COMPILE=1 server's compiles, in all"
    )
    parser.add_argument(
        "--wait-ms", type=lambda v: [int(x) for x in v.split(",")], default=[250], help="BATCH_WAIT_MS values"
    )
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out_dir = args.out.parent
    args.work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    sizes = (64, 64) if args.tiny else (512, 1024)
    clients = [int(c) for c in args.clients.split(",")]
    env = environment()
    try:
        sd, sdxl = args.work / "sd21-base", args.work / "sdxl-base"
        section("build_sd", lambda: build_and_save(sd21_base, sd, args), args, env)
        section("plain_W", lambda: plain_diffusers(sd, args, sizes[0], "W"), args, env)
        free_memory()
        for wait_ms in args.wait_ms:
            section("server_W", lambda w=wait_ms: server_runs(sd, args, sizes[0], f"W_wait{w}", clients, w), args, env)
        if args.baseline_src:  # the same workload on another source tree, in the same run
            baseline = args.baseline_src.resolve()
            section(
                "server_W_baseline",
                lambda: server_runs(sd, args, sizes[0], "W_baseline", clients, args.wait_ms[0], baseline),
                args,
                env,
            )
        if args.switch_interval_ms is not None:
            ms = args.switch_interval_ms
            section(
                "server_W_switch",
                lambda: server_runs(
                    sd, args, sizes[0], f"W_switch{ms:g}ms", clients, args.wait_ms[0], ROOT / "src", ms
                ),
                args,
                env,
            )
        for label, extra in args.variant:
            variant_clients = [int(c) for c in args.variant_clients.split(",")] if args.variant_clients else clients
            section(
                f"server_W_{label}",
                lambda label=label, extra=extra, vc=variant_clients: server_runs(
                    sd, args, sizes[0], f"W_{label}", vc, args.wait_ms[0], extra_env=extra
                ),
                args,
                env,
            )
        if not args.skip_sdxl:
            section("build_sdxl", lambda: build_and_save(sdxl_base, sdxl, args), args, env)
            section("plain_SDXL", lambda: plain_diffusers(sdxl, args, sizes[1], "SDXL"), args, env)
            free_memory()
            section("server_SDXL", lambda: server_runs(sdxl, args, sizes[1], "SDXL", [1]), args, env)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
