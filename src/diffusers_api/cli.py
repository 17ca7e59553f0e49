"""Command line: `diffusers-api serve | ...`. Flags override the environment (see config.Settings).

Only argparse is imported at module level so that `--help` answers at once; torch, diffusers and the server
are imported when a command actually runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

# flag -> Settings field, for the flags shared by the commands that load a model
_MODEL_FLAGS = {
    "model": "model_id",
    "precision": "model_precision",
    "revision": "model_revision",
    "variant": "model_variant",
    "models_dir": "models_dir",
    "device": "device",
    "pipeline": "pipeline",
    "scheduler": "scheduler",
    "hf_model_id": "hf_model_id",
    "model_url": "model_url",
    "checkpoint_url": "checkpoint_url",
    "checkpoint_config_url": "checkpoint_config_url",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-api",
        description="A fast inference server for Hugging Face diffusers image models. "
        "Every flag has an environment variable of the same name in upper case (e.g. --model is MODEL_ID).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = _add_command(
        commands,
        "serve",
        help="run the HTTP server",
        description="Run the HTTP server: POST / (docker-diffusers-api envelope), POST /v1/generate, "
        "GET /health, /healthcheck, /ping, /docs.",
    )
    _add_model_flags(serve)
    serve.add_argument("--host", help="interface to listen on (HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT, default 8000)")
    serve.add_argument(
        "--runtime-downloads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let requests name other models (RUNTIME_DOWNLOADS, default off)",
    )
    serve.add_argument("--cors-origins", help="comma-separated allowed origins (CORS_ORIGINS)")
    serve.add_argument("--max-queue", type=int, help="waiting requests before BUSY (MAX_QUEUE, default 64)")
    serve.add_argument("--debug", action="store_true", default=None, help="include stack traces in errors")
    serve.add_argument("--log-level", help="debug, info, warning, error (LOG_LEVEL, default info)")
    serve.add_argument(
        "--ray",
        action="store_true",
        help="run under Ray Serve on a local Ray cluster: --replicas engines, one per GPU, behind Ray's proxy on "
        "--host and --port (needs the ray extra: pip install 'diffusers-api[ray]')",
    )
    serve.add_argument("--replicas", type=int, help="with --ray: engines to run, each on its own GPU (default 1)")
    download = _add_command(
        commands,
        "download",
        help="fetch the configured model into MODELS_DIR (at image build time)",
        description="Fetch the configured model into MODELS_DIR with the same code the server loads it with: "
        "from the cloud cache (MODEL_URL; built, packed and uploaded there when missing), a single-file "
        "checkpoint (CHECKPOINT_URL, converted), or the hub. The server then starts from disk, also with "
        "OFFLINE=1 and no network at all.",
    )
    _add_model_flags(download)
    download.add_argument(
        "--upscaler",
        action="append",
        dest="upscalers",
        metavar="NAME",
        help="also fetch this upscaler's weights (a name of UPSCALER_URLS, e.g. RealESRGAN_x4plus); repeatable",
    )
    download.add_argument("--log-level", help="debug, info, warning, error (LOG_LEVEL, default info)")
    _add_runpod_parser(commands)
    _add_client_parser(commands)
    return parser


def _add_command(commands: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand's parser, which its namespace carries, so that a flag it does not know is reported with its
    own usage rather than the top level's."""
    command: argparse.ArgumentParser = commands.add_parser(name, **kwargs)
    command.set_defaults(command_parser=command)
    return command


def _add_runpod_parser(commands: Any) -> None:
    runpod = _add_command(
        commands,
        "runpod",
        help="run the RunPod serverless worker (needs the runpod extra: pip install 'diffusers-api[runpod]')",
        description="Load the model, then serve RunPod serverless jobs (legacy envelope or native request as the "
        "job input). The runpod SDK's own flags pass through untouched: --test_input JSON runs one job and exits; "
        "--rp_serve_api --rp_api_host H --rp_api_port P serves RunPod's local test API (/run, /runsync, "
        "/status/{id}); --rp_log_level DEBUG (default: --log-level). A flag that is neither this command's nor "
        "the SDK's is an error.",
    )
    _add_model_flags(runpod)
    runpod.add_argument(
        "--runpod-concurrency",
        type=int,
        help="jobs one worker holds at once (RUNPOD_CONCURRENCY, default MAX_BATCH_SIZE)",
    )
    runpod.add_argument("--log-level", help="debug, info, warning, error (LOG_LEVEL, default info)")


def _add_client_parser(commands: Any) -> None:
    client = _add_command(
        commands,
        "client",
        help="send named test requests to a server or a RunPod endpoint",
        description="Send named test requests (legacy envelopes, input images drawn in code) and save the images. "
        "Plain mode posts to TEST_URL; --jobs queues them at TEST_URL/v1/jobs and follows their progress; "
        "--runpod submits to the endpoint's /run (RUNPOD_BASE_URL/<--endpoint>) with RUNPOD_API_KEY and polls "
        "/status/{id} until the job ends.",
    )
    client.add_argument("tests", nargs="*", metavar="TEST", help="test names (default txt2img; --list lists them)")
    client.add_argument("--list", action="store_true", help="list the named tests and exit")
    client.add_argument("--url", help="server URL (TEST_URL, default http://localhost:8000/)")
    client.add_argument("--runpod", action="store_true", help="send as RunPod jobs (/run, then poll /status)")
    client.add_argument(
        "--endpoint",
        metavar="ID|URL",
        help="with --runpod: the endpoint's id (RUNPOD_ENDPOINT_ID), or its URL, e.g. http://localhost:8000 for "
        "`diffusers-api runpod --rp_serve_api`",
    )
    client.add_argument(
        "--jobs", action="store_true", help="send as server jobs (POST /v1/jobs), printing each step's progress"
    )
    client.add_argument("--call-arg", action="append", metavar="K=V", help="set callInputs.K (repeatable)")
    client.add_argument("--model-arg", action="append", metavar="K=V", help="set modelInputs.K (repeatable)")
    client.add_argument("--output-dir", default="output", help="where images are saved (default ./output)")
    client.add_argument("--timeout", type=float, default=600, help="seconds to wait for each test (default 600)")
    client.add_argument("--api-key", help="bearer token for a server with API_KEY set")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="model id: hub repo, local directory or builtin/tiny-sd (MODEL_ID)")
    group.add_argument("--precision", help="fp16, bf16, fp32 (MODEL_PRECISION; default: as stored)")
    group.add_argument("--revision", help="hub revision (MODEL_REVISION)")
    group.add_argument("--variant", help="weight-file variant, e.g. fp16 (MODEL_VARIANT)")
    group.add_argument("--models-dir", help="model store directory (MODELS_DIR, default ~/.cache/diffusers-api)")
    group.add_argument("--device", help="auto, cuda, cuda:N, mps, cpu (DEVICE, default auto)")
    group.add_argument("--pipeline", help="default pipeline: class name, txt2img, img2img, inpaint (PIPELINE)")
    group.add_argument("--scheduler", help="default scheduler class or alias (SCHEDULER)")
    group.add_argument("--hf-model-id", help="hub repo when --model is only an alias (HF_MODEL_ID)")
    group.add_argument("--model-url", help="cloud-cache archive: s3://..., http(s)://... (MODEL_URL)")
    group.add_argument("--checkpoint-url", help="single-file .safetensors checkpoint (CHECKPOINT_URL)")
    group.add_argument(
        "--checkpoint-config-url",
        help="original-SD .yaml config to convert the checkpoint with (CHECKPOINT_CONFIG_URL)",
    )


_NOT_SETTINGS = {"command", "command_parser", "version", "ray", "replicas", "upscalers"}


def settings_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings fields the flags set (those given)."""
    return {
        _MODEL_FLAGS.get(name, name): value
        for name, value in vars(args).items()
        if value is not None and name not in _NOT_SETTINGS
    }


def settings_from_args(args: argparse.Namespace) -> Any:
    """Settings from the environment with the given flags laid over it; exits with a clear message if invalid."""
    from pydantic import ValidationError

    from .config import Settings
    from .schema import describe_validation_error

    flags = settings_flags(args)
    try:
        return Settings(**flags)
    except ValidationError as exc:
        raise SystemExit(f"diffusers-api: invalid configuration: {describe_validation_error(exc)}") from None


def serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.model_id and not settings.runtime_downloads:
        print(
            "diffusers-api: no model to serve: pass --model (e.g. --model builtin/tiny-sd) or set MODEL_ID",
            file=sys.stderr,
        )
        return 2
    if args.replicas is not None and not args.ray:
        print("diffusers-api: --replicas goes with --ray (one server process runs one engine)", file=sys.stderr)
        return 2
    if args.ray:
        from .ray import serve_locally

        return serve_locally(settings_flags(args), args.replicas, settings)
    from .http.server import serve as serve_http
    from .logs import configure_logging

    configure_logging(settings.log_level)
    return serve_http(settings)


def download(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    upscalers = getattr(args, "upscalers", None) or []
    if not settings.model_id and not upscalers:
        print("diffusers-api: nothing to download: pass --model (or set MODEL_ID) or --upscaler", file=sys.stderr)
        return 2
    from .logs import configure_logging

    configure_logging(settings.log_level)
    if settings.model_id and (status := _download_model(settings)):
        return status
    return _download_upscalers(settings, upscalers)


def _download_model(settings: Any) -> int:
    from .errors import DiffusersAPIError
    from .models.prefetch import model_directory
    from .models.sources import fetch
    from .models.spec import ModelSpec

    spec = ModelSpec.from_settings(settings)
    assert spec is not None
    on_disk = model_directory(spec, settings) is not None
    timings: dict[str, float] = {}
    try:
        directory = fetch(spec, settings, timings)
    except DiffusersAPIError as exc:
        print(f"diffusers-api: download failed ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    print(f"{spec.describe()}: {what_download_did(timings, on_disk)}: {directory}")
    return 0


def _download_upscalers(settings: Any, names: list[str]) -> int:
    """Each upscaler's weights into MODELS_DIR/upscalers, where requests then find them (with RUNTIME_DOWNLOADS=0
    too, which forbids only downloads at request time)."""
    from .errors import DiffusersAPIError
    from .models.upscalers import TINY_UPSCALER, upscaler_file

    build_time = settings.model_copy(update={"runtime_downloads": True})
    for name in names:
        timings: dict[str, float] = {}
        try:
            path = upscaler_file(name, build_time, timings)
        except DiffusersAPIError as exc:
            print(f"diffusers-api: download of upscaler {name} failed ({exc.code}): {exc.message}", file=sys.stderr)
            return 1
        print(f"upscaler {name}: {what_download_did(timings, on_disk=name != TINY_UPSCALER)}: {path}")
    return 0


def what_download_did(timings: dict[str, float], on_disk: bool) -> str:
    """`download`'s report in words, from the phases `fetch` timed (milliseconds). With an upload, the download
    phase is the cloud cache's miss and the source's download: both are the building of the archive."""
    seconds = sum(timings.values()) / 1000
    if "upload" in timings:
        return f"added to the cloud cache (MODEL_URL): fetched from its source, packed and uploaded in {seconds:.1f} s"
    if "download" in timings:
        return f"downloaded in {seconds:.1f} s"
    if on_disk:
        return "already on disk, nothing to download"
    return "generated here (a built-in model), nothing to download"


def runpod(args: argparse.Namespace, sdk_args: list[str]) -> int:
    try:
        return _run_worker(args, sdk_args)
    except ModuleNotFoundError as exc:
        if exc.name != "runpod":
            raise
        print(
            "diffusers-api: the RunPod worker needs the runpod SDK, an optional extra: "
            "pip install 'diffusers-api[runpod]'",
            file=sys.stderr,
        )
        return 2


def _run_worker(args: argparse.Namespace, sdk_args: list[str]) -> int:
    settings = settings_from_args(args)
    if sdk_args:  # ours are parsed already: the rest must be the SDK's, checked before anything loads
        from .runpod_worker import unknown_sdk_flags

        strangers = " ".join(unknown_sdk_flags(sdk_args, settings.log_level))
        if strangers:
            args.command_parser.error(f"unrecognized arguments (neither ours nor the runpod SDK's): {strangers}")
    if not settings.model_id and not settings.runtime_downloads:
        print("diffusers-api: no model for the worker: pass --model or set MODEL_ID", file=sys.stderr)
        return 2
    from .models import prefetch

    prefetch.start(settings)  # the weights are read while runpod, torch and diffusers import (models/prefetch.py)
    from .logs import configure_logging
    from .runpod_worker import run

    configure_logging(settings.log_level)
    run(settings)  # the runpod SDK reads its own flags from sys.argv and usually exits itself
    return 0


def client(args: argparse.Namespace) -> int:
    from .client import TESTS, ClientError, run_tests

    if args.list:
        print("\n".join(TESTS))
        return 0
    try:
        return run_tests(
            args.tests or ["txt2img"],
            url=args.url,
            runpod=args.runpod,
            endpoint=args.endpoint,
            jobs=args.jobs,
            call_args=args.call_arg,
            model_args=args.model_arg,
            output_dir=args.output_dir,
            timeout_s=args.timeout,
            api_key=args.api_key,
        )
    except ClientError as exc:
        print(f"diffusers-api client: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `runpod` leaves the flags it does not know to the runpod SDK, which reads them from sys.argv itself.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "runpod":
        (args.command_parser if args.command else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.version:
        from . import __version__

        print(f"diffusers-api {__version__}")
        return 0
    if args.command == "serve":
        return serve(args)
    if args.command == "download":
        return download(args)
    if args.command == "runpod":
        return runpod(args, unknown)
    if args.command == "client":
        return client(args)
    parser.print_help()
    return 2
