"""Kernel speed against plain diffusers, in one process on one GPU: SDPA backends, torchao float8, max-autotune.

    python bench/kernel_bench.py --out bench/results/kernel.jsonl            # CUDA (sized for ~2.5 min on an H200)
    python bench/kernel_bench.py --with-compile --budget-s 900 --out k.jsonl # also torch.compile (many minutes)
    python bench/kernel_bench.py --tiny --out /tmp/kernel.jsonl              # the same code on a CPU, tiny models
    python bench/kernel_bench.py --show bench/results/kernel.jsonl           # one short line per result

Workloads, in this order: W (SD2.1-base architecture, 512x512) and SDXL at 1024x1024, each built from its config
with random fp16 weights directly on the GPU (bench/gpu_bench.py's builders, seeded, so that a rebuild has the same
weights), and run as plain diffusers' pipeline call: 20 steps DPM-Solver++ 2M, CFG 7.5, a fixed seed,
output_type="np". The variants, each measured against the baseline of the same run:

  baseline        fp16, PyTorch's own choice of SDPA backend
  flash, cudnn,   the UNet's attention forced onto one SDPA backend (torch.nn.attention.sdpa_kernel); the text
  efficient       encoders and the VAE keep the default choice (the VAE's mid-block attention has heads of 512
                  channels, which flash and cuDNN do not take; CLIP passes a mask)
  fp8             torchao's float8 dynamic activation + float8 weight quantization (per tensor: torchao's per-row
                  scaling wants bf16 weights) of the UNet's nn.Linear layers; needs compute capability >= 8.9
  fp8_sdpa        fp8 with the fastest SDPA backend of this run (skipped when none beat the default)
  compiled,       with --with-compile, after both workloads' eager variants, on a rebuilt pipeline: the UNet under
  fp8_compiled    torch.compile(mode=--compile-mode), in process; the first warm-up call holds the compile

Quantizing is not undone, so the fp8 variants come last among the eager ones. Per variant and workload one JSON
line (printed, and appended to --out, with the GPU, torch, diffusers and torchao versions): median and min of the
timed calls after the warm-up ones (device synchronised), the speedup against the baseline (baseline median over
the variant's), peak memory, and the last image's difference from the baseline's last image (same seed) in 8-bit
levels: mean and max absolute difference, PSNR, and the share of values off by more than one level. The baseline
line compares its own first and last image instead (the run-to-run noise floor). A variant that raises or runs
past its time limit is recorded as an error and the rest go on; those the --budget-s (the whole run) does not
reach are recorded as skipped, as are the ones the device cannot run, each with its reason. The random weights
make noise images: the differences measure numerical drift, not how a real picture changes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import signal
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from gpu_bench import PROMPT, emit, environment, free_memory, sd21_base, sdxl_base, sync  # noqa: E402

GUIDANCE = 7.5
SEED = 0  # the image seed and the weights' seed
SDPA_BACKENDS = ("flash", "cudnn", "efficient")
EAGER_VARIANTS = ("baseline", *SDPA_BACKENDS, "fp8", "fp8_sdpa")
COMPILE_VARIANTS = ("compiled", "fp8_compiled")
FP8_MIN_CAPABILITY = (8, 9)


class VariantTimeout(Exception):
    """A variant ran past its time limit."""


@dataclass(frozen=True)
class Workload:
    name: str
    builder: Callable[[bool, str, torch.dtype], Any]
    size: int
    runs: int


@dataclass
class Run:
    """One workload's pipeline while its variants run, with what they need from each other."""

    workload: Workload
    pipe: Any
    fingerprint: float
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    fp8: dict[str, Any] | None = None  # how the UNet was quantized, once it is


@dataclass
class Reference:
    """A workload's baseline, which the other variants compare with, on a rebuilt pipeline too (the compiled ones)."""

    median_s: float
    image: np.ndarray
    fingerprint: float


# --- the pipelines --------------------------------------------------------------------------------------------


def build(workload: Workload, args: argparse.Namespace) -> Run:
    from diffusers import DPMSolverMultistepScheduler

    with torch.random.fork_rng():  # the same weights in every build (the compiled variants compare with the eager
        torch.manual_seed(SEED)  # baseline), and the caller's random state as it was
        pipe = workload.builder(args.tiny, args.device, args.dtype)
    # DPM-Solver++ 2M everywhere (gpu_bench's full-size builders have it already, the tiny SDXL has Euler)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    if getattr(pipe, "safety_checker", None) is not None:  # the tiny SD has one; W has none
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return Run(workload, pipe, fingerprint(pipe.unet))


def preload() -> None:
    """Import what the builders import, outside every time limit: an import stopped halfway stays broken."""
    import diffusers
    import transformers

    for name in ("DPMSolverMultistepScheduler", "StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        getattr(diffusers, name)  # diffusers imports lazily, at first access
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        getattr(transformers, name)


def fingerprint(module: torch.nn.Module) -> float:
    """The sum of all weights: equal in two builds when the seeded random initialisation gave the same weights."""
    with torch.no_grad():
        return float(torch.stack([p.float().sum() for p in module.parameters()]).sum().item())


def generate(pipe: Any, size: int, steps: int) -> np.ndarray:
    images: np.ndarray = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images
    return images


# --- the variants ----------------------------------------------------------------------------------------------


def sdpa_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


@contextlib.contextmanager
def forced_sdpa(unet: torch.nn.Module, name: str) -> Iterator[dict[str, Any]]:
    """The UNet's forward inside sdpa_kernel(backend): only that backend may run its attention."""
    from torch.nn.attention import sdpa_kernel

    original = unet.forward
    backend = sdpa_backend(name)

    def forward(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(backend):
            return original(*args, **kwargs)

    unet.forward = forward  # an instance attribute: nn.Module.__call__ calls it, `del` brings back the method
    try:
        yield {"sdpa": name}
    finally:
        del unet.forward


def sdpa_unavailable(name: str, args: argparse.Namespace) -> str | None:
    if args.device != "cuda":
        # PyTorch has a flash kernel for CPUs too; the others are CUDA's alone
        return None if name == "flash" else f"the {name} SDPA backend runs on CUDA only (this run: {args.device})"
    if name == "flash" and args.capability < (8, 0):
        return f"flash attention needs compute capability >= 8.0 (this GPU: {args.capability_text})"
    if name == "cudnn" and not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    return None


@functools.cache
def torchao_import() -> tuple[str | None, str | None]:
    """torchao's version, or why it does not import."""
    try:
        import torchao
    except ImportError:
        return None, "torchao is not installed (bench/gpu-wheels.txt carries the version that matches torch 2.11)"
    except Exception as exc:  # a build for another torch can fail in other ways
        return None, f"torchao does not import: {type(exc).__name__}: {exc}"
    return str(torchao.__version__), None


def fp8_unavailable(args: argparse.Namespace) -> str | None:
    if args.device != "cuda" or args.capability < FP8_MIN_CAPABILITY:
        # torchao asserts the same: its float8 matmuls are CUDA's (sm89+), MI300's or XPU's
        return f"float8 needs a CUDA GPU of compute capability >= 8.9 (this run: {args.capability_text})"
    return torchao_import()[1]


def quantize_fp8(unet: torch.nn.Module) -> dict[str, Any]:
    """torchao float8 dynamic activation + float8 weight quantization of every nn.Linear, in place."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerTensor, quantize_

    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    started = time.perf_counter()
    # set_inductor_config=False: torchao's recommended inductor settings (coordinate-descent tuning among them)
    # would otherwise stay set for the whole process, and change what the compiled variants measure
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False)
    quantize_(unet, config, filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear))
    sync()
    return {
        "fp8": "torchao Float8DynamicActivationFloat8WeightConfig, per tensor, e4m3",
        "quantize_s": round(time.perf_counter() - started, 2),
        "linear_layers": len(linears),
        # torchao leaves a layer whose dimensions are not multiples of 16 as it was
        "quantized_layers": sum(isinstance(m.weight, Float8Tensor) for m in linears),
    }


@contextlib.contextmanager
def fp8_unet(run: Run) -> Iterator[dict[str, Any]]:
    if run.fp8 is None:
        run.fp8 = quantize_fp8(run.pipe.unet)
    yield dict(run.fp8)


def best_sdpa(run: Run) -> str | None:
    """The SDPA backend of this run whose median beat the baseline's by the most, if any did."""
    baseline = run.results.get("baseline", {}).get("median_s")
    medians = {n: r["median_s"] for n, r in run.results.items() if n in SDPA_BACKENDS and r.get("status") == "ok"}
    faster = {n: m for n, m in medians.items() if baseline is not None and m < baseline}
    return min(faster, key=faster.__getitem__) if faster else None


@contextlib.contextmanager
def fp8_with_sdpa(run: Run) -> Iterator[dict[str, Any]]:
    backend = best_sdpa(run)
    assert backend is not None  # fp8_sdpa_unavailable said so
    with fp8_unet(run) as info, forced_sdpa(run.pipe.unet, backend) as sdpa:
        yield info | sdpa


def fp8_sdpa_unavailable(run: Run, args: argparse.Namespace) -> str | None:
    if reason := fp8_unavailable(args):
        return reason
    if best_sdpa(run) is None:
        return "no SDPA backend beat the default in this run: the fp8 line is this combination"
    return None


@contextlib.contextmanager
def compiled_unet(run: Run, args: argparse.Namespace, fp8: bool) -> Iterator[dict[str, Any]]:
    """The UNet under torch.compile; the first call compiles (inside the variant's first warm-up call)."""
    torch._dynamo.reset()  # no graphs or guards left from the variant before
    info = quantize_fp8(run.pipe.unet) if fp8 else {}
    original = run.pipe.unet
    run.pipe.unet = torch.compile(original, mode=args.compile_mode)
    try:
        yield info | {"compile_mode": args.compile_mode}
    finally:
        run.pipe.unet = original


def variant_context(name: str, run: Run, args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    if name == "baseline":
        return contextlib.nullcontext({"sdpa": "default"})
    if name in SDPA_BACKENDS:
        return forced_sdpa(run.pipe.unet, name)
    if name == "fp8":
        return fp8_unet(run)
    if name == "fp8_sdpa":
        return fp8_with_sdpa(run)
    return compiled_unet(run, args, fp8=name == "fp8_compiled")


def unavailable(name: str, run: Run, args: argparse.Namespace) -> str | None:
    if name in SDPA_BACKENDS:
        return sdpa_unavailable(name, args)
    if name in ("fp8", "fp8_compiled"):
        return fp8_unavailable(args)
    if name == "fp8_sdpa":
        return fp8_sdpa_unavailable(run, args)
    return None


# --- measuring -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise VariantTimeout after `seconds` (a compile or a kernel search that runs away). SIGALRM: the main thread
    only; an alarm set before (pytest-timeout's) is set again afterwards, less the time spent here."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise VariantTimeout(f"ran past its time limit of {seconds:.0f} s")

    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - started), 0.001))


def timed_call(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    sync()
    started = time.perf_counter()
    image = fn()
    sync()
    return time.perf_counter() - started, image


def measure(run: Run, args: argparse.Namespace, progress: dict[str, Any]) -> dict[str, Any]:
    """Warm-up calls, then the timed ones; `progress` holds the times so far, for a variant that times out."""
    workload = run.workload

    def call() -> np.ndarray:
        return generate(run.pipe, workload.size, args.steps)

    progress["warmup_s"], progress["times_s"] = [], []
    first = None
    for _ in range(args.warmup):
        seconds, image = timed_call(call)
        progress["warmup_s"].append(round(seconds, 4))
        first = image if first is None else first
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0
    for _ in range(workload.runs):
        seconds, image = timed_call(call)
        progress["times_s"].append(round(seconds, 4))
        first = image if first is None else first
    times = progress["times_s"]
    return {
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        "resident_memory_gb": round(resident / 1e9, 3) if cuda else None,
        "first_image": first,
        "image": image,
    }


def levels(image: np.ndarray) -> np.ndarray:
    """8-bit levels, as diffusers' numpy_to_pil makes them."""
    return np.asarray((np.nan_to_num(image, nan=0.0).clip(0, 1) * 255).round(), dtype=np.int16)


def image_difference(image: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    diff = np.abs(levels(image) - levels(reference))
    mse = float(np.mean(np.square(diff, dtype=np.float64)))
    return {
        "mean_abs": round(float(diff.mean()), 4),
        "max_abs": int(diff.max()),
        "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 2),  # None: identical
        "share_over_1_level": round(float(np.mean(diff > 1)), 6),
        "nan_values": int(np.isnan(image).sum()),
    }


def compared(name: str, measured: dict[str, Any], run: Run, reference: Reference | None) -> dict[str, Any]:
    """Speedup and image difference against the baseline (for the baseline itself: its first image against its
    last, the noise floor)."""
    if name == "baseline":
        return {"speedup": 1.0, "image_diff": image_difference(measured["image"], measured["first_image"])}
    if reference is None:
        return {"speedup": None, "image_diff": None, "note": "no baseline in this run to compare with"}
    result = {
        "speedup": round(reference.median_s / measured["median_s"], 3),
        "image_diff": image_difference(measured["image"], reference.image),
    }
    if reference.fingerprint != run.fingerprint:  # a rebuilt pipeline whose weights came out different
        result["note"] = "rebuilt weights differ from the baseline's: the image difference is not comparable"
    return result


def run_variant(
    name: str, run: Run, args: argparse.Namespace, deadline: float, reference: Reference | None
) -> dict[str, Any]:
    record = workload_fields(run.workload, args) | {"variant": name}
    if reason := unavailable(name, run, args) or budget_spent(deadline, run, args):
        return record | {"status": "skipped", "reason": reason}
    limit = min(args.compile_timeout_s if name in COMPILE_VARIANTS else args.variant_timeout_s, time_left(deadline))
    started = time.monotonic()
    progress: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        # recorded once each (why an SDPA backend refused, say), whatever the filters; libraries' deprecations not
        warnings.simplefilter("default")
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            with time_limit(limit), variant_context(name, run, args) as settings:
                measured = measure(run, args, progress)
            record |= {"status": "ok", "settings": settings}
            record |= {k: v for k, v in measured.items() if not k.endswith("image")} | progress
            record |= compared(name, measured, run, reference)
        except Exception as exc:  # one variant's failure must not lose the others' numbers
            record |= {"status": "error", "error": f"{type(exc).__name__}: {exc}"} | progress
            record["trace"] = traceback.format_exc()[-2000:]
    if caught:
        record["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})[:8]
    record["variant_s"] = round(time.monotonic() - started, 1)
    if record["status"] == "ok" and name == "baseline":
        run.results[name] = record | {"image": measured["image"]}
    else:
        run.results[name] = record
    return record


def workload_fields(workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "what": "kernel",
        "workload": workload.name,
        "size": workload.size,
        "steps": args.steps,
        "guidance": GUIDANCE,
        "scheduler": "DPM++ 2M",
        "dtype": str(args.dtype).removeprefix("torch."),
        "warmup": args.warmup,
        "runs": workload.runs,
    }


def time_left(deadline: float) -> float:
    return deadline - time.monotonic()


def budget_spent(deadline: float, run: Run | None, args: argparse.Namespace) -> str | None:
    """Why a variant is not started: less time left than the baseline of its workload took (or 1 s)."""
    need = max(1.0, run.results.get("baseline", {}).get("variant_s", 0) if run else 0)
    left = time_left(deadline)
    if left >= need:
        return None
    spent = f"the run's time budget (--budget-s {args.budget_s:g}) is spent"
    return f"{spent}: {max(left, 0):.0f} s left, ~{need:.0f} s needed"


# --- the run ---------------------------------------------------------------------------------------------------


def run_phase(
    workload: Workload,
    names: list[str],
    args: argparse.Namespace,
    deadline: float,
    references: dict[str, Reference],
    env: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Build the workload's pipeline and run `names` on it, one line each; its results by variant."""
    if not names:
        return {}
    blocked = budget_spent(deadline, None, args)
    run = None
    if not blocked:
        started = time.monotonic()
        try:
            with time_limit(min(args.variant_timeout_s, time_left(deadline))):
                run = build(workload, args)
            sync()
        except Exception as exc:
            blocked = f"the pipeline was not built: {type(exc).__name__}: {exc}"
        emit(workload_fields(workload, args) | build_record(run, blocked, started), args, env)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if run is None:
            record = workload_fields(workload, args) | {"variant": name, "status": "skipped", "reason": blocked}
        else:
            record = run_variant(name, run, args, deadline, references.get(workload.name))
        emit(record, args, env)
        results[name] = record
        if run is not None and name == "baseline" and record["status"] == "ok":
            references[workload.name] = Reference(record["median_s"], run.results[name]["image"], run.fingerprint)
    del run
    free_memory()
    return results


def build_record(run: Run | None, error: str | None, started: float) -> dict[str, Any]:
    record: dict[str, Any] = {"variant": "build", "build_s": round(time.monotonic() - started, 2)}
    if run is None:
        return record | {"status": "error", "error": error}
    parameters = sum(p.numel() for p in run.pipe.unet.parameters())
    return record | {"status": "ok", "unet_parameters_m": round(parameters / 1e6, 1)}


def summary(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Each workload's variants, fastest first, and which beat the baseline."""
    workloads = {}
    for workload, records in results.items():
        ok = {n: r for n, r in records.items() if r.get("status") == "ok" and r.get("speedup") is not None}
        order = sorted(ok, key=lambda n: -ok[n]["speedup"])
        workloads[workload] = {
            "speedup": {n: ok[n]["speedup"] for n in order},
            "faster_than_baseline": [n for n in order if n != "baseline" and ok[n]["speedup"] > 1],
            "not_measured": {n: r["status"] for n, r in records.items() if n not in ok},
        }
    return {"what": "kernel_summary", "workloads": workloads}


def show(path: Path) -> None:
    """One short line per result of a kernel_bench output file (the GPU session's summary prints these)."""
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("what") == "kernel_summary":
            print("summary", json.dumps(record["workloads"]))
        elif record.get("what") == "kernel":
            print(short_line(record))


def short_line(record: dict[str, Any]) -> str:
    head = f"{record['workload']:<5} {record['variant']:<13} {record['status']:<8}"
    if record["status"] != "ok":
        return f"{head} {' '.join((record.get('reason') or record.get('error', '')).split())}"[:400]
    if record["variant"] == "build":
        return f"{head} {record['build_s']} s, UNet {record['unet_parameters_m']}M parameters"
    diff = record.get("image_diff") or {}
    if diff:
        against = "identical" if diff["max_abs"] == 0 else f"mean {diff['mean_abs']} max {diff['max_abs']}"
        against += f" psnr {diff['psnr_db']} dB" if diff["psnr_db"] is not None else ""
    else:
        against = record.get("note", "-")
    first = f"{record['warmup_s'][0]} s" if record.get("warmup_s") else "-"
    return (
        f"{head} median {record['median_s']:.4f} s  min {record['min_s']:.4f} s  x{record.get('speedup')}  "
        f"peak {record.get('peak_memory_gb')} GB  image: {against}  first call {first}"
    )


def variant_list(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    known = (*EAGER_VARIANTS, *COMPILE_VARIANTS)
    if unknown := [n for n in names if n not in known]:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the built-in tiny models (a CPU check of the script)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernel.jsonl"))
    parser.add_argument("--show", type=Path, metavar="FILE", help="print FILE's results one short line each, and exit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant before the timed ones")
    parser.add_argument("--runs-w", type=int, default=6, help="timed calls per variant for W")
    parser.add_argument("--runs-sdxl", type=int, default=4, help="timed calls per variant for SDXL")
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--budget-s", type=float, default=240, help="the whole run; variants not reached are skipped")
    parser.add_argument("--variant-timeout-s", type=float, default=90, help="the most one eager variant may take")
    parser.add_argument(
        "--variants",
        type=variant_list,
        default=None,
        help=f"run only these (comma-separated; default: {','.join(EAGER_VARIANTS)}, and the compiled ones with "
        "--with-compile)",
    )
    parser.add_argument("--with-compile", action="store_true", help="also the torch.compile variants (minutes each)")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--compile-timeout-s", type=float, default=480, help="the most one compiled variant may take")
    args = parser.parse_args(argv)
    if min(args.steps, args.runs_w, args.runs_sdxl) < 1 or args.warmup < 0:
        parser.error("--steps, --runs-w and --runs-sdxl must be at least 1, --warmup at least 0")
    return args


def device_fields(args: argparse.Namespace) -> None:
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = torch.float16 if args.device == "cuda" else torch.float32
    args.capability = torch.cuda.get_device_capability() if args.device == "cuda" else (0, 0)
    args.capability_text = "sm{}{}".format(*args.capability) if args.device == "cuda" else args.device


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.show:
        show(args.show)
        return
    deadline = time.monotonic() + args.budget_s
    device_fields(args)
    preload()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment() | {"torchao": torchao_import()[0], "capability": args.capability_text}
    sizes = (64, 64) if args.tiny else (512, 1024)
    workloads = [Workload("W", sd21_base, sizes[0], args.runs_w)]
    if not args.skip_sdxl:
        workloads.append(Workload("SDXL", sdxl_base, sizes[1], args.runs_sdxl))
    wanted = args.variants or [*EAGER_VARIANTS, *(COMPILE_VARIANTS if args.with_compile else ())]
    references: dict[str, Reference] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {w.name: {} for w in workloads}
    for group in (EAGER_VARIANTS, COMPILE_VARIANTS):  # every eager variant before any compile
        for workload in workloads:
            names = [n for n in group if n in wanted]
            results[workload.name] |= run_phase(workload, names, args, deadline, references, env)
    emit(summary(results), args, env)


if __name__ == "__main__":
    main()
