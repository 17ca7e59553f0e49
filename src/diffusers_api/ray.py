"""Ray Serve: one engine per replica, one replica per GPU, and Ray's proxy routing the requests between them.

    serve run diffusers_api.ray:app model_id=builtin/tiny-sd replicas=2
    diffusers-api serve --ray --replicas 2 --model builtin/tiny-sd      (serve_locally: a cluster of this machine)

`app` is a Ray Serve application builder: its arguments are Settings fields (lower-case environment names, laid
over the replica's environment) and the deployment's options below. Each replica loads its model before Ray
routes to it (`__serve_build_asgi_app__` runs once the constructor has returned), so no request meets a replica
still loading, then serves the same FastAPI app as
`diffusers-api serve` (every route unchanged), answering with an `X-Replica` header that names it. Ray's health
check asks the engine, so a replica whose engine is DEFUNCT (a fatal device error) is replaced.

Jobs (/v1/jobs) live in the replica that made them. With `session_affinity` (the default), Ray routes the requests
that carry the same `X-Session-Id` header to the same replica (Ray's consistent-hash router, strict: a session
never moves while its replica lives), so a client sends one session id with a job's submit and every later call
for it. Requests without the header are spread over the replicas by a hash of their own id (not by load;
`session_affinity=false` gives Ray's default, load-aware router).

This is the only module that imports ray, and it does so lazily: parsing the arguments (`plan`) needs no Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "diffusers-api"
REPLICA_HEADER = "X-Replica"
SESSION_HEADER = "X-Session-Id"  # Ray's default session header (RAY_SERVE_SESSION_ID_HEADER_KEY)
CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"

# Ray's default (5) would turn an NDJSON stream or a few polls into Ray's own backpressure; the engine's queue
# (MAX_QUEUE, BUSY) is the bound that matters.
DEFAULT_MAX_ONGOING_REQUESTS = 256

# argument -> what it sets, for the error that lists them
DEPLOYMENT_ARGS = {
    "replicas": "number of replicas (default 1)",
    "gpus_per_replica": "GPUs each replica holds (default: 1 where there is a GPU, else 0)",
    "cpus_per_replica": "CPUs each replica holds (default: 1 on CPU, 0 beside a GPU)",
    "max_ongoing_requests": f"requests Ray sends one replica at once (default {DEFAULT_MAX_ONGOING_REQUESTS})",
    "session_affinity": f"route requests with the same {SESSION_HEADER} to the same replica (default true)",
}


class InvalidRayArgs(ValueError):
    """An application argument that is neither a Settings field nor a deployment option, or a bad value."""


@dataclass(frozen=True)
class ReplicaPlan:
    """What the builder's arguments ask for: the replicas' settings (as given, validated) and their placement."""

    settings: dict[str, str]
    replicas: int
    num_gpus: float
    num_cpus: float
    max_ongoing_requests: int
    session_affinity: bool

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment` for this plan."""
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "num_replicas": self.replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
        }
        if self.session_affinity and self.replicas > 1:
            options["request_router_config"] = {
                "request_router_class": CONSISTENT_HASH_ROUTER,
                # strict: a job's calls must reach the replica that holds it, even when that replica is busy
                "request_router_kwargs": {"num_fallback_replicas": 0},
            }
        return options


def plan(args: Mapping[str, object], gpus_here: Callable[[], int] | None = None) -> ReplicaPlan:
    """Parse the builder's arguments; raises InvalidRayArgs naming every unknown argument or bad value."""
    unknown = sorted(k for k in args if k not in DEPLOYMENT_ARGS and k not in Settings.model_fields)
    if unknown:
        known = ", ".join(f"{name} ({what})" for name, what in DEPLOYMENT_ARGS.items())
        raise InvalidRayArgs(
            f"unknown argument(s) {', '.join(unknown)}: pass Settings fields (lower-case environment names, "
            f"e.g. model_id=builtin/tiny-sd) or {known}"
        )
    settings = {k: str(v) for k, v in args.items() if k not in DEPLOYMENT_ARGS}
    _validate_settings(settings)
    replicas = _number(args, "replicas", int, 1, least=1)
    gpus_default = 1 if (gpus_here or visible_gpus)() > 0 else 0
    num_gpus = _number(args, "gpus_per_replica", float, gpus_default, least=0)
    return ReplicaPlan(
        settings=settings,
        replicas=replicas,
        num_gpus=num_gpus,
        num_cpus=_number(args, "cpus_per_replica", float, 0 if num_gpus else 1, least=0),
        max_ongoing_requests=_number(args, "max_ongoing_requests", int, DEFAULT_MAX_ONGOING_REQUESTS, least=1),
        session_affinity=_flag(args, "session_affinity", True),
    )


def _validate_settings(settings: dict[str, str]) -> None:
    from pydantic import ValidationError

    from .schema import describe_validation_error

    try:
        resolved = Settings(**settings)  # type: ignore[arg-type]  # pydantic converts the strings
    except ValidationError as exc:
        raise InvalidRayArgs(f"invalid settings: {describe_validation_error(exc)}") from None
    if not resolved.model_id and not resolved.runtime_downloads:
        raise InvalidRayArgs(
            "no model to serve: pass model_id=... (e.g. model_id=builtin/tiny-sd), or set MODEL_ID where the "
            "application is built"
        )


def _number(args: Mapping[str, object], name: str, kind: Callable[[str], float], default: float, least: float) -> Any:
    """`args[name]` made by `kind` (int or float), at least `least`; `default` when absent."""
    raw = args.get(name)
    if raw is None:
        return default
    try:
        value = kind(str(raw))
    except ValueError:
        raise InvalidRayArgs(f"{name}: expected a number, got {raw!r}") from None
    if not value >= least:  # NaN too
        raise InvalidRayArgs(f"{name}: must be at least {least}, got {raw!r}")
    return value


def _flag(args: Mapping[str, object], name: str, default: bool) -> bool:
    raw = args.get(name)
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidRayArgs(f"{name}: expected true or false, got {raw!r}")


def visible_gpus(devices: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """NVIDIA GPUs this machine shows (as Ray's own detection would find them), without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(list(devices.iterdir())) if devices.is_dir() else 0


def app(args: dict[str, str]) -> Any:
    """The Ray Serve application builder (`serve run diffusers_api.ray:app key=value ...`)."""
    return _application(plan(args))


def _application(replica_plan: ReplicaPlan) -> Any:
    from ray import serve

    deployment = serve.deployment(**replica_plan.deployment_options())(serve.ingress()(DiffusersReplica))
    return deployment.bind(replica_plan.settings)


def serve_locally(flags: Mapping[str, object], replicas: int | None, settings: Settings) -> int:
    """`diffusers-api serve --ray`: the application on a new Ray cluster of this machine, Ray's proxy on
    HOST:PORT, until SIGINT or SIGTERM (0); 2 on bad arguments or without Ray, 1 if the replicas fail to start.
    `flags` are the settings given on the command line, passed on to the replicas (the environment applies there
    too). For a cluster of several machines, `serve run` / `serve deploy` with `app` instead."""
    from .logs import configure_logging

    args = {name: value for name, value in flags.items() if name not in ("host", "port")}
    if replicas is not None:
        args["replicas"] = replicas
    try:
        replica_plan = plan(args)
    except InvalidRayArgs as exc:
        print(f"diffusers-api: {exc}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        print("diffusers-api: --ray needs Ray Serve: pip install 'diffusers-api[ray]'", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local")  # a cluster of this machine's own, whatever RAY_ADDRESS says: it ends with the command
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(_application(replica_plan), name=DEPLOYMENT_NAME, route_prefix="/")
        except RuntimeError as exc:  # the replicas failed to start (Ray retried them): the reason is in exc
            print(f"diffusers-api: the replicas could not start: {exc}", file=sys.stderr)
            return 1
        log.info("serving %d replica(s) on http://%s:%d", replica_plan.replicas, settings.host, settings.port)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


class DiffusersReplica:
    """One replica: an engine on its device, the HTTP app over it. Made into a deployment by `app`."""

    def __init__(self, settings: dict[str, str]) -> None:
        from ray import serve

        from .engine import make_engine
        from .events import EventHub

        # A replica logs to Ray's files, where loading progress bars only litter (as logs.configure_logging says
        # off a terminal); Ray's own logging set-up is left alone.
        for name, value in (
            ("TQDM_DISABLE", "1"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("TRANSFORMERS_VERBOSITY", "error"),
        ):
            os.environ.setdefault(name, value)
        self.settings = Settings(**settings)  # type: ignore[arg-type]
        self.engine = make_engine(self.settings)
        self.events = EventHub(self.settings)
        self.name = serve.get_replica_context().replica_id.unique_id

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Load the model, then build the app. Ray calls this once, after the constructor, and routes to the
        replica only once it returns: no request meets a replica still loading its model."""
        from .generation import boot
        from .http.app import create_app

        await boot(self.engine, self.events.for_boot())
        if self.engine.setup_error:
            raise RuntimeError(f"the model could not be loaded: {self.engine.setup_error}")
        log.info("replica %s ready: %s", self.name, self.settings.model_id)
        http = create_app(self.settings, self.engine, self.events, booted=True)
        http.add_middleware(ReplicaHeader, name=self.name)
        return http

    def check_health(self) -> None:
        """Ray calls this periodically; raising gets the replica replaced."""
        from .engine import Health

        health = self.engine.health
        if health in (Health.DEFUNCT, Health.SETUP_FAILED):
            raise RuntimeError(f"the engine is {health.value}: {self.engine.setup_error or 'a fatal device error'}")


class ReplicaHeader:
    """Adds `X-Replica: <name>` to every HTTP answer, so a client (or a test) sees which replica served it."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)
