"""`diffusers-api client`: send named tests, print their times and `$timings`, save their images; and
`verify_webhook` for receivers of this server's webhooks."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..events import verify_signature
from .base import ClientError, ClientSettings
from .named import TESTS, build_test, parse_pairs
from .transports import Client, JobsClient, Reply, RunPodClient


def save_images(reply: Reply, folder: Path, stem: str) -> list[Path]:
    """Write the reply's images as `<stem>[-i].<ext>` into `folder`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    extension = str(reply.body.get("$meta", {}).get("image_format", "PNG")).lower().replace("jpeg", "jpg")
    images = reply.images
    paths = []
    for index, data in enumerate(images):
        suffix = f"-{index}" if len(images) > 1 else ""
        path = folder / f"{stem}{suffix}.{extension}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def verify_webhook(key: str, body: bytes, headers: Mapping[str, str], tolerance_s: float = 300) -> bool:
    """For webhook receivers: True when `body` was signed by a server holding SIGN_KEY `key`, less than
    `tolerance_s` ago. Check the raw body bytes, before parsing them."""
    return verify_signature(key, body, headers, tolerance_s)


def run_tests(
    names: list[str],
    *,
    url: str | None = None,
    runpod: bool = False,
    endpoint: str | None = None,
    jobs: bool = False,
    call_args: list[str] | None = None,
    model_args: list[str] | None = None,
    output_dir: str | Path = "output",
    timeout_s: float = 600,
    api_key: str | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """`diffusers-api client`: send each named test, print its request time and `$timings`, save its images.
    Raises ClientError (with a message for the user) at the first test that fails."""
    unknown = [name for name in names if name not in TESTS]
    if unknown:
        raise ClientError(f"no test named {', '.join(unknown)}; known: {', '.join(TESTS)}")
    model, call = parse_pairs(model_args), parse_pairs(call_args)
    if jobs and runpod:
        raise ClientError("--jobs and --runpod exclude each other: RunPod has jobs of its own")
    if endpoint and not runpod:
        raise ClientError("--endpoint names a RunPod endpoint: it goes with --runpod")
    settings = ClientSettings()
    if runpod:
        sender: Client | JobsClient | RunPodClient = _runpod_sender(settings, url, endpoint, timeout_s, api_key)
    else:
        sender = _sender(settings, url, jobs, timeout_s, api_key)
    for name in names:
        if isinstance(sender, JobsClient):
            sender.on_progress = _progress_printer(name, out)
        out(f"{name}: sending to {sender.target}")
        reply = sender.send(build_test(name, model, call))
        for event in reply.events:
            out(f"{name}: event {json.dumps(event)}")
        out(f"{name}: request took {reply.seconds:.2f} s; $timings {json.dumps(reply.timings)}")
        for path in save_images(reply, Path(output_dir), name):
            out(f"{name}: saved {path}")
    return 0


def _progress_printer(name: str, out: Callable[[str], None]) -> Callable[[dict[str, Any]], None]:
    def report(status: dict[str, Any]) -> None:
        progress = status.get("progress", {})
        line = f"{name}: job {status['id']} {status['status']} ({progress.get('stage')})"
        if progress.get("steps"):
            line += f" step {progress['step']}/{progress['steps']}"
        if progress.get("eta_s") is not None:
            line += f", about {progress['eta_s']:g} s left"
        out(line)

    return report


def _sender(
    settings: ClientSettings, url: str | None, jobs: bool, timeout_s: float, api_key: str | None
) -> Client | JobsClient:
    if jobs:
        return JobsClient(url or settings.test_url, api_key=api_key, timeout_s=timeout_s)
    return Client(url or settings.test_url, api_key=api_key, timeout_s=timeout_s)


def _runpod_sender(
    settings: ClientSettings, url: str | None, endpoint: str | None, timeout_s: float, api_key: str | None
) -> RunPodClient:
    """`endpoint` (else RUNPOD_ENDPOINT_ID) is an id under `url` (else RUNPOD_BASE_URL), or a URL of its own."""
    key = api_key or (settings.runpod_api_key.get_secret_value() if settings.runpod_api_key else None)
    endpoint = endpoint or settings.runpod_endpoint_id
    if not endpoint:  # RunPod's bare API URL is no endpoint: a job posted there goes nowhere
        raise ClientError(
            "--runpod needs an endpoint: --endpoint ID (or RUNPOD_ENDPOINT_ID), or --endpoint URL for a local "
            "one (diffusers-api runpod --rp_serve_api)"
        )
    if endpoint.startswith(("http://", "https://")):
        return RunPodClient(endpoint, None, key, timeout_s=timeout_s)
    return RunPodClient(url or settings.runpod_base_url, endpoint, key, timeout_s=timeout_s)
