"""The FastAPI app factory, the composition root of HTTP mode: it builds the services (engine, events, jobs,
metrics), the lifespan that loads the model, middleware (CORS, body limit) and the error mapping.

Routes are thin adapters that declare what they need (deps.py): routes.py (native /v1 and health), jobs.py
(/v1/jobs), legacy.py (`POST /`), metrics.py. The model loads in the background once the server is up, so
/health and /ping answer STARTING while it loads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline  # /docs and /redoc with Swagger UI's and ReDoc's files from the package
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import DiffusersAPIError, InvalidInputs, from_exception
from ..events import EventHub
from ..generation import boot
from ..jobs import JobStore
from ..metrics import Metrics
from ..models import prefetch
from .deps import Services
from .middleware import BodyLimitMiddleware
from .openapi import declare_api_key
from .responses import error_response, http_exception_response

if TYPE_CHECKING:
    from ..config import Settings
    from ..engine import Engine

log = logging.getLogger(__name__)

# At shutdown, how long the webhooks still queued get. Bounded and short: one delivery thread serves every receiver
# in order, so events queued behind a receiver that hangs would wait for it whatever the bound.
WEBHOOK_FLUSH_S = 5.0


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    events: EventHub | None = None,
    on_setup_failed: Callable[[str], None] | None = None,
    booted: bool = False,
) -> FastAPI:
    """Build the app. Without an engine, the one for `settings` is made (see `make_engine`). `on_setup_failed`
    is called with the reason when the model fails to load (`serve` exits); without it the app stays up,
    answering SETUP_FAILED. `booted`: the engine has loaded its model already, so the lifespan does not (a Ray
    replica loads it before Ray sends it requests)."""
    if engine is None:
        from ..engine import make_engine

        engine = make_engine(settings)
    hub = events or EventHub(settings)
    metrics = Metrics(engine)
    hub.request_sinks.append(metrics.request_sink)
    services = Services(settings, engine, hub, JobStore(settings), metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Weights already on disk are read into the page cache while the engine imports torch and diffusers. Not
        # earlier: on a cold disk that read would slow the imports the server needs to start listening.
        loading = None
        if not booted:
            prefetch.start(settings)
            loading = asyncio.create_task(_boot(services, on_setup_failed))
        yield
        if loading is not None:
            loading.cancel()
        services.jobs.cancel_all()
        await services.engine.stop()
        # The webhook thread dies with the process: the last events (a drained job's CANCELLED, a failed boot's
        # init error) are delivered first, for a bounded time.
        if not await asyncio.to_thread(hub.sender.flush, WEBHOOK_FLUSH_S):
            log.warning("shutdown: some webhooks were not delivered in time")

    app = FastAPIOffline(
        redoc_url=None,  # ui.py serves /redoc, over the same files
        title="diffusers-api",
        version=__version__,
        summary="Image generation with Hugging Face diffusers, wire-compatible with docker-diffusers-api",
        lifespan=lifespan,
    )
    app.state.services = services
    _add_middleware(app, settings)
    _add_error_handlers(app, settings)
    _add_routes(app)
    if settings.api_key is not None:
        declare_api_key(app)
    return app


async def _boot(services: Services, on_setup_failed: Callable[[str], None] | None) -> None:
    await boot(services.engine, services.events.for_boot())
    if services.engine.setup_error and on_setup_failed is not None:
        on_setup_failed(services.engine.setup_error)


def _add_routes(app: FastAPI) -> None:
    from . import jobs, legacy, routes, upscale
    from .metrics import router as metrics_router

    app.include_router(routes.health_router)
    app.include_router(metrics_router)
    app.include_router(routes.router)
    app.include_router(upscale.router)
    app.include_router(jobs.router)
    app.include_router(jobs.train_router)
    app.include_router(jobs.events_router)
    app.include_router(legacy.router)
    from . import ui
    from .schedulers import router as schedulers_router

    app.include_router(schedulers_router)
    ui.install(app)  # GET / and /ui: the playground (POST / above stays the legacy API)


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
        return error_response(request.url.path, exc, settings.debug)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        message = "; ".join(f"{e['loc'].removeprefix('body.')}: {e['msg']}" for e in errors)
        return error_response(request.url.path, InvalidInputs(message, errors=errors), settings.debug)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return http_exception_response(request, exc, settings.debug)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, from_exception(exc), settings.debug)
