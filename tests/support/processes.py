"""The real CLI in a subprocess: start it with a log file, wait for it to answer, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffusers_api", *args]


def offline_env(models_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a test process: offline, the session's models, no stray RunPod or webhook settings."""
    stray = ("SEND_URL", "SIGN_KEY", "MODEL_ID", "RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_ENDPOINT_ID", "RUNPOD_API_KEY")
    env = {name: value for name, value in os.environ.items() if name not in stray}
    return env | {"HF_HUB_OFFLINE": "1", "MODELS_DIR": str(models_dir), "RUNPOD_LOG_LEVEL": "INFO"} | extra


@dataclass
class Process:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running(
    command: list[str], env: dict[str, str], url: str, log: Path, ready: Callable[[str], bool], timeout: float = 240
) -> Iterator[Process]:
    """Start `command`, wait until `ready(url)` holds, yield it, then stop it (SIGTERM, then SIGKILL)."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    handle = Process(url, process, log)
    try:
        _wait(handle, ready, timeout)
        yield handle
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ping_ready(url: str) -> bool:
    """The server has loaded its model: GET /ping answers 200 (204 while it loads)."""
    return httpx.get(f"{url}/ping", timeout=5).status_code == 200


@contextmanager
def serving(
    models_dir: Path, log: Path, env: dict[str, str] | None = None, ready: Callable[[str], bool] = ping_ready
) -> Iterator[Process]:
    """`diffusers-api serve` on the built-in tiny SD model, on a free loopback port, until the block ends.
    `env` adds to (or overrides) `offline_env`."""
    port = free_port()
    command = cli("serve", "--model", "builtin/tiny-sd", "--host", "127.0.0.1", "--port", str(port))
    with running(command, offline_env(models_dir) | (env or {}), f"http://127.0.0.1:{port}", log, ready) as process:
        yield process


def _wait(handle: Process, ready: Callable[[str], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise AssertionError(f"exited with {handle.process.returncode}:\n{handle.output()[-5000:]}")
        try:
            if ready(handle.url):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s:\n{handle.output()[-5000:]}")
