"""Soak test: N clients send a mix of requests to one server for a bounded time; does it stay correct and flat?

    python bench/soak.py --duration 30                       # starts `diffusers-api serve` on builtin/tiny-sd
    python bench/soak.py --clients 32 --duration 600 --out bench/results/soak-cpu.jsonl
    python bench/soak.py --url http://host:8000 --pid 1234   # a running server (--pid: its RSS, same machine)

Each client loops over operations drawn at random (seeded) from a mix:

    legacy    POST /                       the docker-diffusers-api envelope
    native    POST /v1/generate            JSON
    stream    POST /v1/generate            stream_events: NDJSON lines, the result last
    job       POST /v1/jobs, then GET /v1/jobs/{id} until it ends (COMPLETED expected)
    job-sse   POST /v1/jobs, then its server-sent events until the stream closes
    cancel    POST /v1/jobs, then DELETE /v1/jobs/{id} (CANCELLED, or COMPLETED if it was quicker)
    invalid   POST /v1/generate with a width that is not a multiple of 8 (422 expected)

Every HTTP request counts once: `sent`, then `2xx`, `4xx`, `5xx`, or `lost` (no answer: a connection error or
no answer within --timeout; the first few are listed with their exception). `unexpected` counts answers outside
what the operation expects (a 4xx to a valid request, a job that ends FAILED, a stream without its result).
Latencies (p50, p99) are of whole operations.
The server's resident memory is read from /proc/<pid>/status every second; its growth per 1,000 requests is the
least-squares slope of RSS over requests answered, after the warm-up (--warmup, a fraction of the run). A server
this script started is stopped with SIGTERM at the end, and how long it took to exit is reported.

One JSON line goes to --out; a summary is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

OPERATIONS = {"legacy": 3, "native": 3, "stream": 1, "job": 2, "job-sse": 1, "cancel": 2, "invalid": 1}


@dataclass
class Tally:
    """What the clients saw. One per run, shared by every client (one event loop: no locks needed)."""

    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    examples: list[str] = field(default_factory=list)  # the first few surprises, to say what went wrong

    @property
    def answered(self) -> int:
        return sum(n for key, n in self.statuses.items() if key != "lost")

    def count(self, response: httpx.Response | None) -> None:
        self.statuses["sent"] += 1
        self.statuses["lost" if response is None else f"{response.status_code // 100}xx"] += 1

    def surprise(self, operation: str, what: str) -> None:
        self.unexpected[operation] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{operation}: {what}"[:500])


class Client:
    def __init__(self, http: httpx.AsyncClient, tally: Tally, args: argparse.Namespace, index: int) -> None:
        self.http, self.tally, self.args = http, tally, args
        self.random = random.Random(args.seed * 1000 + index)
        self.index = index

    async def run(self, until: float) -> None:
        names, weights = list(OPERATIONS), list(OPERATIONS.values())
        while time.monotonic() < until:
            operation = self.random.choices(names, weights)[0]
            started = time.perf_counter()
            await getattr(self, "op_" + operation.replace("-", "_"))()
            self.tally.latencies[operation].append(time.perf_counter() - started)

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        try:
            response = await self.http.request(method, path, timeout=self.args.timeout, **kwargs)
        except httpx.HTTPError as exc:
            response = None
            self.tally.surprise("lost", f"{method} {path}: {type(exc).__name__}: {exc}")
        self.tally.count(response)
        return response

    def inputs(self) -> dict[str, Any]:
        size = self.args.size
        return {"prompt": f"soak {self.random.random()}", "num_inference_steps": self.args.steps, "width": size,
                "height": size, "seed": self.random.randrange(2**31)}  # fmt: skip

    def expect(self, operation: str, response: httpx.Response | None, status: int) -> bool:
        if response is None:
            return False
        if response.status_code != status:
            self.tally.surprise(operation, f"{response.status_code} {response.text[:300]}")
            return False
        return True

    async def op_legacy(self) -> None:
        inputs = self.inputs()
        call = {"SCHEDULER": "DPMSolverMultistepScheduler", "safety_checker": False}
        response = await self.send("POST", "/", json={"modelInputs": inputs, "callInputs": call})
        if self.expect("legacy", response, 200) and "image_base64" not in response.json():  # type: ignore[union-attr]
            self.tally.surprise("legacy", "no image_base64")

    async def op_native(self) -> None:
        response = await self.send("POST", "/v1/generate", json=self.inputs() | {"image_format": "JPEG"})
        if self.expect("native", response, 200) and not response.json().get("images"):  # type: ignore[union-attr]
            self.tally.surprise("native", "no images")

    async def op_stream(self) -> None:
        body = self.inputs() | {"stream_events": True}
        response = await self.send("POST", "/v1/generate", json=body)
        if self.expect("stream", response, 200):
            last = json.loads(response.text.strip().splitlines()[-1])  # type: ignore[union-attr]
            if "images" not in last:
                self.tally.surprise("stream", f"last line {str(last)[:200]}")

    async def op_invalid(self) -> None:
        response = await self.send("POST", "/v1/generate", json=self.inputs() | {"width": self.args.size + 1})
        if self.expect("invalid", response, 422) and response.json()["error"]["code"] != "INVALID_INPUTS":  # type: ignore[union-attr]
            self.tally.surprise("invalid", response.text)  # type: ignore[union-attr]

    async def submit(self, operation: str) -> str | None:
        response = await self.send("POST", "/v1/jobs", json=self.inputs())
        return response.json()["id"] if self.expect(operation, response, 202) else None  # type: ignore[union-attr]

    async def op_job(self) -> None:
        job_id = await self.submit("job")
        deadline = time.monotonic() + self.args.timeout
        while job_id is not None and time.monotonic() < deadline:
            await asyncio.sleep(self.args.poll_s)
            response = await self.send("GET", f"/v1/jobs/{job_id}")
            if not self.expect("job", response, 200):
                return
            status = response.json()["status"]  # type: ignore[union-attr]
            if status in ("COMPLETED", "FAILED", "CANCELLED"):
                if status != "COMPLETED":
                    self.tally.surprise("job", response.text)  # type: ignore[union-attr]
                return
        if job_id is not None:
            self.tally.surprise("job", f"not finished after {self.args.timeout} s")

    async def op_job_sse(self) -> None:
        job_id = await self.submit("job-sse")
        if job_id is None:
            return
        response = await self.send("GET", f"/v1/jobs/{job_id}/events")
        if self.expect("job-sse", response, 200):
            final = response.text.strip().split("\n\n")[-1]  # type: ignore[union-attr]
            if '"status":"COMPLETED"' not in final:
                self.tally.surprise("job-sse", f"last message {final[:200]}")

    async def op_cancel(self) -> None:
        job_id = await self.submit("cancel")
        if job_id is None:
            return
        await asyncio.sleep(self.random.uniform(0, 0.2))  # sometimes queued, sometimes running, sometimes done
        response = await self.send("DELETE", f"/v1/jobs/{job_id}")
        if self.expect("cancel", response, 200) and response.json()["status"] not in ("CANCELLED", "COMPLETED"):  # type: ignore[union-attr]
            self.tally.surprise("cancel", response.text)  # type: ignore[union-attr]


# --- the server and its memory -----------------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def sample_rss(pid: int | None, tally: Tally, samples: list[tuple[float, int, int]], until: float) -> None:
    """(seconds since start, requests answered, RSS in kB), once a second."""
    started = time.monotonic()
    while pid is not None and time.monotonic() < until:
        rss = rss_kb(pid)
        if rss is not None:
            samples.append((time.monotonic() - started, tally.answered, rss))
        await asyncio.sleep(1)


def growth_per_1000(samples: list[tuple[float, int, int]], warmup: float) -> float | None:
    """kB of RSS per 1,000 requests after the warm-up: the least-squares slope of RSS over requests answered."""
    if not samples:
        return None
    end = samples[-1][0]
    after = [(requests, rss) for at, requests, rss in samples if at >= end * warmup]
    if len(after) < 3 or after[-1][0] == after[0][0]:
        return None
    slope = statistics.linear_regression([float(r) for r, _ in after], [float(kb) for _, kb in after]).slope
    return round(slope * 1000, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    models_dir = args.models_dir or Path(tempfile.mkdtemp(prefix="soak-models-"))
    command = [sys.executable, "-m", "diffusers_api", "serve", "--model", "builtin/tiny-sd", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    env = os.environ | {"MODELS_DIR": str(models_dir), "OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ping", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not get ready in 300 s")


def stop_server(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    return {"exit_code": code, "shutdown_s": round(time.monotonic() - started, 2)}


# --- the run -----------------------------------------------------------------------------------------------


async def soak(url: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    tally, samples = Tally(), []  # type: ignore[var-annotated]
    # Idle connections are dropped before uvicorn's keep-alive timeout (5 s) closes them: a request sent on a
    # connection the server is closing at that moment would be lost to the race, not to the server.
    limits = httpx.Limits(
        max_connections=args.clients * 2, max_keepalive_connections=args.clients * 2, keepalive_expiry=2
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    until = time.monotonic() + args.duration
    async with httpx.AsyncClient(base_url=url, limits=limits, headers=headers) as http:
        clients = [Client(http, tally, args, index) for index in range(args.clients)]
        await asyncio.gather(sample_rss(pid, tally, samples, until), *(client.run(until) for client in clients))
    return report(tally, samples, args)


def report(tally: Tally, samples: list[tuple[float, int, int]], args: argparse.Namespace) -> dict[str, Any]:
    every = [s for values in tally.latencies.values() for s in values]
    record: dict[str, Any] = {
        "what": "soak",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "clients": args.clients,
        "duration_s": args.duration,
        "size": args.size,
        "steps": args.steps,
        **{key: tally.statuses[key] for key in ("sent", "2xx", "4xx", "5xx", "lost")},
        "unexpected": sum(n for name, n in tally.unexpected.items() if name != "lost"),
        "operations": {name: len(values) for name, values in sorted(tally.latencies.items())},
        "p50_s": _quantile(every, 0.5),
        "p99_s": _quantile(every, 0.99),
        "per_operation": {
            name: {"p50_s": _quantile(values, 0.5), "p99_s": _quantile(values, 0.99)}
            for name, values in sorted(tally.latencies.items())
        },
    }
    if samples:
        warm = next((s for s in samples if s[0] >= samples[-1][0] * args.warmup), samples[-1])
        record |= {"rss_start_mb": round(samples[0][2] / 1024, 1), "rss_after_warmup_mb": round(warm[2] / 1024, 1),
                   "rss_end_mb": round(samples[-1][2] / 1024, 1),
                   "rss_growth_kb_per_1000": growth_per_1000(samples, args.warmup)}  # fmt: skip
    if tally.examples:
        record["unexpected_examples"] = tally.examples
    return record


def _quantile(values: list[float], q: float) -> float | None:
    if len(values) < 2:
        return round(values[0], 3) if values else None
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; default: start `diffusers-api serve` on builtin/tiny-sd")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its RSS")
    parser.add_argument("--api-key", help="bearer token, for a server with API_KEY")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600, help="seconds")
    parser.add_argument("--size", type=int, default=32, help="width and height of every image")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of every request")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a request counts as lost")
    parser.add_argument("--poll-s", type=float, default=0.1, help="how often a job's status is read")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run left out of RSS growth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-dir", type=Path, help="where the started server keeps builtin/tiny-sd")
    parser.add_argument("--out", type=Path, help="append the JSON result here (e.g. bench/results/soak-cpu.jsonl)")
    args = parser.parse_args()
    process = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        log = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
        print(f"starting diffusers-api serve (log: {log})", file=sys.stderr)
        process, url = start_server(args, log)
        pid = process.pid
    try:
        record = asyncio.run(soak(url, pid, args))
    finally:
        stopped = stop_server(process) if process is not None else {}
    record |= stopped
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
