"""Cold start: process start to first image, the real CLI in a subprocess, median of several starts.

    python bench/cold_start.py --out bench/results/cold_start.jsonl          # CPU: builtin/tiny-sd
    python bench/cold_start.py --model sd21 --out bench/results/cold_start.jsonl   # GPU: full-size SD2.1-base
    python bench/cold_start.py --model sd21 --until ready --cold-cache all     # load only, nothing in the cache

PERFORMANCE.md's target: weights on local disk, process start to first image (no compile) <= 4 s on an H200.
Each start of `diffusers-api serve` is timed from outside, from the moment the process is spawned:

- listening: the first answer of GET /ping (interpreter, the web stack's imports, app creation, server start);
- ready: GET /ping answers 200 (the model is loaded: its imports, reading the weights, moving them to the device);
- first_image: the answer to the first POST /v1/generate, sent as soon as the server was ready.

The server's own `$timings` of that first request (`init`: the model load; `inference`) are recorded beside
them. `--command runpod` times `diffusers-api runpod --test_input` instead: process start to the job's result
(the process exits after it), which is how a RunPod serverless worker starts. `--importtime` adds one start with
PYTHONPROFILEIMPORTTIME=1 and reports the seconds of imports per top-level package in each phase (before
listening, during the model load, during the first request). `--cold-cache all` evicts the model's weights and the
interpreter's installed packages from the page cache before every start (posix_fadvise DONTNEED, no root
needed), as on a fresh node; `--cold-cache weights` evicts the weights alone (code in the image, weights on a
volume). The difference to a warm start is time spent reading the disk.

Models: `builtin/tiny-sd` (default: the built-in tiny model, generated once into the work directory), `sd21` or
`sdxl` (full-size architectures with random weights, built with bench/gpu_bench.py's builders and saved with
save_pretrained, fp16 on a GPU), or the path of any diffusers directory. One JSON line per start and one
summary line (medians) are printed and appended to --out, with the torch and diffusers versions and the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpu_bench import Server, build_and_save, emit, environment, request_body, sd21_base, sdxl_base  # noqa: E402

BUILDERS = {"sd21": (sd21_base, 512), "sdxl": (sdxl_base, 1024)}
OFFLINE = {"HF_HUB_OFFLINE": "1", "OFFLINE": "1"}  # weights on local disk: no network on the way

# Lines in the server's log that end each phase (for --importtime).
SERVE_MARKS = (("listening", "Application startup complete"), ("model_load", "diffusers_api.models.store: loaded"))
RUNPOD_MARKS = (("before_model_load", "diffusers_api.models.store: loaded"),)


# --- one start -------------------------------------------------------------------------------------------------


def serve_once(model: str, size: int, args: argparse.Namespace, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Start `diffusers-api serve`, wait for its first image (or only for ready), stop it; seconds since spawn."""
    server = Server(Path(model), args, log, env | OFFLINE)
    record: dict[str, Any] = {}
    try:
        with httpx.Client(timeout=600) as http:
            record["listening_s"] = _poll(server, http, lambda status: True, args.poll_ms / 1000)
            record["ready_s"] = _poll(server, http, lambda status: status == 200, args.poll_ms / 1000)
            record["cpu_s_at_ready"] = cpu_seconds(server.process.pid)
            if args.until == "image":
                response = http.post(f"{server.url}/v1/generate", json=request_body(args, size, 1))
                response.raise_for_status()
                record["first_image_s"] = _since(server.started)
                record["first_request_timings_ms"] = response.json()["timings"]
    finally:
        server.stop()
    record["load_ms_logged"] = _logged_load_ms(log)
    return record


def _poll(server: Server, http: httpx.Client, done: Any, interval: float, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}")
        try:
            if done(http.get(f"{server.url}/ping").status_code):
                return _since(server.started)
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise TimeoutError("the server did not answer")


def runpod_once(model: str, size: int, args: argparse.Namespace, env: dict[str, str], log: Path) -> dict[str, Any]:
    """`diffusers-api runpod --test_input JOB`: the worker loads the model, runs the job and exits."""
    job = {"input": request_body(args, size, 1)}
    command = [sys.executable, "-m", "diffusers_api", "runpod", "--model", model, "--test_input", json.dumps(job)]
    command += ["--models-dir", str(args.work / "store")]
    if args.device == "cuda":
        command += ["--precision", "fp16"]
    started = time.perf_counter()
    with log.open("ab") as out:
        process_env = os.environ | {"PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"} | OFFLINE | env
        done = subprocess.run(command, env=process_env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    total = _since(started)
    text = log.read_text(errors="replace")
    if done.returncode != 0 or "completed successfully" not in text:
        raise RuntimeError(f"the worker failed ({done.returncode}): {text[-2000:]}")
    return {"first_image_s": total, "load_ms_logged": _logged_load_ms(log)}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds `pid` has used so far (Linux), all threads: a figure that other processes on a
    busy machine disturb far less than wall time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _logged_load_ms(log: Path) -> float | None:
    found = re.findall(r"diffusers_api\.models\.store: loaded .* in (\d+) ms", log.read_text(errors="replace"))
    return float(found[-1]) if found else None


# --- page cache --------------------------------------------------------------------------------------------------


def evict(*roots: Path) -> int:
    """Drop the files under `roots` from the page cache (clean pages only; nothing is written). Returns a count."""
    count = 0
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


def cache_roots(model_dir: Path, which: str) -> list[Path]:
    """What a fresh node reads from disk: the weights, and (all) the installed packages and the sources."""
    import sysconfig

    if which == "weights":
        return [model_dir]
    return [model_dir, Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"]), ROOT / "src"]


# --- imports per phase -----------------------------------------------------------------------------------------


def import_breakdown(log: Path, marks: tuple[tuple[str, str], ...], top: int = 8) -> dict[str, Any]:
    """Seconds of top-level imports (PYTHONPROFILEIMPORTTIME lines) per package, split at the log's phase marks.

    A top-level entry is an import made outside any other import (by a function at run time, or the entry
    module itself); its cumulative time covers everything it pulled in."""
    phases: dict[str, Counter[str]] = {name: Counter() for name, _ in marks}
    phases["rest"] = Counter()
    names = [name for name, _ in marks] + ["rest"]
    current = 0
    for line in log.read_text(errors="replace").splitlines():
        while current < len(marks) and marks[current][1] in line:
            current += 1
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) == 1:
            phases[names[current]][match.group(3).split(".")[0]] += int(match.group(1))
    return {
        name: {
            "total_s": round(sum(counter.values()) / 1e6, 3),
            "top_s": {pkg: round(us / 1e6, 3) for pkg, us in counter.most_common(top)},
        }
        for name, counter in phases.items()
    }


# --- the run ---------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> tuple[str, int, Path]:
    """The model to serve, the image size to ask for, and its directory (for --cold-cache)."""
    if args.model in BUILDERS:
        builder, size = BUILDERS[args.model]
        path = args.work / args.model
        record = build_and_save(builder, path, args)
        print(json.dumps(record), flush=True)
        return str(path), size, path
    if args.model.startswith("builtin/"):
        from diffusers_api.models.builtin import ensure_builtin

        return args.model, 64, ensure_builtin(args.model, args.work / "store")
    return args.model, args.size or 512, Path(args.model)


def median_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each time, and of the phases between them (per start, then the median)."""
    phases = {
        "listening_s": lambda r: r.get("listening_s"),
        "ready_s": lambda r: r.get("ready_s"),
        "first_image_s": lambda r: r.get("first_image_s"),
        "load_phase_s": lambda r: _between(r, "listening_s", "ready_s"),
        "first_request_s": lambda r: _between(r, "ready_s", "first_image_s"),
        "load_ms_logged": lambda r: r.get("load_ms_logged"),
        "cpu_s_at_ready": lambda r: r.get("cpu_s_at_ready"),
    }
    summary: dict[str, Any] = {}
    for name, value in phases.items():
        values = [v for v in map(value, records) if v is not None]
        if values:
            summary[f"median_{name}"] = round(statistics.median(values), 3)
    return summary


def _between(record: dict[str, Any], start: str, end: str) -> float | None:
    if record.get(start) is None or record.get(end) is None:
        return None
    return float(record[end] - record[start])


def measure(args: argparse.Namespace, variants: dict[str, Path], env: dict[str, Any]) -> None:
    """--runs starts of each variant (source tree), interleaved so that a busy machine hurts them alike."""
    model, size, model_dir = prepare(args)
    once = serve_once if args.command == "serve" else runpod_once
    base = {"what": f"cold_start_{args.command}", "model": args.model, "device": args.device, "label": args.label}
    base |= {"precision": "fp16" if args.device == "cuda" else args.precision, "poll_ms": args.poll_ms}
    base |= {"until": args.until if args.command == "serve" else "image", "cold_cache": args.cold_cache}
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for run in range(args.runs):
        order = list(variants) if run % 2 == 0 else list(reversed(variants))
        for name in order:
            if args.cold_cache:
                evict(*cache_roots(model_dir, args.cold_cache))
            log = args.work / f"{args.command}-{name}-{run}.log"
            timed = once(model, size, args, _source(variants[name], args.precision), log)
            record = base | {"variant": name, "run": run} | timed
            records[name].append(record)
            emit(record, args, env)
    for name, done in records.items():
        emit(base | {"variant": name, "summary": True, "runs": args.runs} | median_summary(done), args, env)
    if not args.importtime:
        return
    marks = SERVE_MARKS if args.command == "serve" else RUNPOD_MARKS
    for name, src in variants.items():
        if args.cold_cache:
            evict(*cache_roots(model_dir, args.cold_cache))
        log = args.work / f"{args.command}-{name}-importtime.log"
        timed = once(model, size, args, _source(src, args.precision) | {"PYTHONPROFILEIMPORTTIME": "1"}, log)
        imports = {"imports": import_breakdown(log, marks)}
        emit(base | {"variant": name, "importtime": True} | timed | imports, args, env)


def _source(src: Path, precision: str) -> dict[str, str]:
    """The environment that makes the server run the package from `src`, in `precision`."""
    return {"PYTHONPATH": f"{src}:{os.environ.get('PYTHONPATH', '')}", "MODEL_PRECISION": precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin/tiny-sd", help="builtin/..., sd21, sdxl or a directory")
    parser.add_argument("--command", choices=("serve", "runpod"), default="serve")
    parser.add_argument("--until", choices=("image", "ready"), default="image", help="serve: stop at this point")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=0, help="image size for a model directory (default 512)")
    parser.add_argument("--image-format", default="JPEG")
    parser.add_argument(
        "--poll-ms", type=float, default=20, help="GET /ping interval, over one kept-alive connection (default 20)"
    )
    parser.add_argument("--precision", default="", help="MODEL_PRECISION of the server (on a GPU: always fp16)")
    parser.add_argument(
        "--cold-cache",
        choices=("all", "weights"),
        help="before each start, evict the weights and the packages (all) or the weights alone from the page cache",
    )
    parser.add_argument("--importtime", action="store_true", help="one more start, with import times per phase")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="another checkout's src/ (e.g. from `git archive main src`), started alternately with this one",
    )
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. the change measured)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cold_start.jsonl"))
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.tiny = False
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    variants = {"current": ROOT / "src"}
    if args.baseline_src:
        variants["baseline"] = args.baseline_src.resolve()
    try:
        measure(args, variants, environment())
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
