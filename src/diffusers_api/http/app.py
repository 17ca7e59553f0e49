"""The FastAPI app factory: lifespan (model load), middleware (CORS, body limit), auth and error mapping.

Routes are thin adapters over the engine (routes.py: native /v1 and health; legacy.py: `POST /`). The model
loads in the background once the server is up, so /health and /ping answer STARTING while it loads.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline  # /docs and /redoc with Swagger UI's and ReDoc's files from the package
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import DiffusersAPIError, InvalidInputs, PayloadTooLarge, Unauthorized, from_exception
from ..events import EventHub, EventQueue, generate, ndjson_stream, start_engine
from ..metrics import Metrics
from ..models import prefetch

if TYPE_CHECKING:
    from ..config import Settings
    from ..engine import Engine
    from ..schema import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None, events: EventHub | None = None) -> FastAPI:
    """Build the app. Without an engine, the one for `settings` is made (see `make_engine`)."""
    if engine is None:
        from ..engine import make_engine

        engine = make_engine(settings)
    hub = events or EventHub(settings)
    from .jobs import JobStore

    jobs = JobStore(settings)
    metrics = Metrics(engine)
    hub.request_sinks.append(metrics.request_sink)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Weights already on disk are read into the page cache while the engine imports torch and diffusers. Not
        # earlier: on a cold disk that read would slow the imports the server needs to start listening.
        prefetch.start(settings)
        loading = asyncio.create_task(start_engine(engine, hub.for_boot()))
        yield
        loading.cancel()
        jobs.cancel_all()
        await engine.stop()

    app = FastAPIOffline(
        redoc_url=None,  # ui.py serves /redoc, over the same files
        title="diffusers-api",
        version=__version__,
        summary="Image generation with Hugging Face diffusers, wire-compatible with docker-diffusers-api",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.events = hub
    app.state.jobs = jobs
    app.state.metrics = metrics
    _add_middleware(app, settings)
    _add_error_handlers(app, settings)

    from . import jobs as jobs_api
    from . import legacy, routes
    from .metrics import router as metrics_router

    app.include_router(routes.health_router)
    app.include_router(metrics_router)
    app.include_router(routes.router)
    app.include_router(jobs_api.router)
    app.include_router(jobs_api.events_router)
    app.include_router(legacy.router)
    from . import ui
    from .schedulers import router as schedulers_router

    app.include_router(schedulers_router)
    ui.install(app)  # GET / and /ui: the playground (POST / above stays the legacy API)
    return app


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(DiffusersAPIError)
    async def api_error(request: Request, exc: DiffusersAPIError) -> JSONResponse:
        return error_response(request, exc, settings.debug)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        message = "; ".join(f"{e['loc'].removeprefix('body.')}: {e['msg']}" for e in errors)
        return error_response(request, InvalidInputs(message, errors=errors), settings.debug)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request, from_exception(exc), settings.debug)


def error_response(request: Request, exc: DiffusersAPIError, debug: bool) -> JSONResponse:
    """`{"error": {...}}` on the native API, `{"$error": {...}}` on the legacy one."""
    key = "error" if request.url.path.startswith("/v1") else "$error"
    return JSONResponse({key: exc.to_wire(debug)}, status_code=exc.status)


async def run_request(
    http_request: Request,
    request: GenerateRequest,
    render: Callable[[GenerateResult], Any],
    render_error: Callable[[DiffusersAPIError], Any],
) -> Response:
    """The one path of both APIs: run `request` on the engine with its events (webhooks), and answer with
    `render(result)` as JSON, or, when it asked for `stream_events`, with NDJSON lines ending in that body."""
    state = http_request.app.state
    if not request.stream_events:
        result = await generate(state.engine, request, await state.events.for_request(request))
        return JSONResponse(render(result))
    stream = EventQueue()
    events = await state.events.for_request(request, extra_sinks=[stream])

    async def work() -> Any:
        return render(await generate(state.engine, request, events))

    lines = ndjson_stream(work(), stream, render_error)
    return StreamingResponse(lines, media_type="application/x-ndjson")


def require_api_key(request: Request) -> None:
    """FastAPI dependency: the bearer token must match API_KEY when one is set."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected.get_secret_value()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <API_KEY>'")


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, by header and by counting what actually arrives.

    The body is read here in full (it is bounded) and replayed to the app, so a chunked upload without a
    Content-Length is refused with the same clear error instead of failing somewhere inside body parsing.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        messages = await self._read_body(receive)
        if messages is None:
            await self._refuse(scope, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> list[Message] | None:
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return None
            if message["type"] != "http.request" or not message.get("more_body", False):
                return messages

    async def _refuse(self, scope: Scope, send: Send) -> None:
        error = PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes", limit=self.max_bytes)
        key = "error" if scope["path"].startswith("/v1") else "$error"
        response = JSONResponse({key: error.to_wire()}, status_code=error.status)
        await response(scope, receive=_no_receive, send=send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
