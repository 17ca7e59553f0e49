"""Native API (/v1) and health routes: thin adapters over the engine."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from .. import generation
from ..engine import Health
from ..engine.base import probe_device_memory
from ..errors import InvalidInputs
from ..imaging import mime_type
from ..schema import GenerateRequest, GenerateResponse, GenerateResult
from .deps import EngineDep, EventsDep, InFlightDep, require_api_key
from .openapi import Health as HealthBody
from .openapi import LegacyHealth, Ping, errors
from .responses import IMAGE_RESPONSES, image_accept, native_error, run_request

router = APIRouter(prefix="/v1", tags=["native"], dependencies=[Depends(require_api_key)])
health_router = APIRouter(tags=["health"])


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=IMAGE_RESPONSES,
    summary="Generate images and wait for them",
)
async def generate(
    body: GenerateRequest, request: Request, engine: EngineDep, hub: EventsDep, in_flight: InFlightDep
) -> Response:
    """Runs the request and returns its images as base64 JSON, or, when `Accept` names an image type
    (image/png, image/jpeg, image/webp, image/jxl), the bytes of the single image it made."""
    wanted = image_accept(request.headers.get("accept", ""))
    if wanted is not None:
        if body.image_count != 1:
            raise InvalidInputs(f"Accept: image/* returns one image, but this request makes {body.image_count}")
        body = body.model_copy(update={"image_format": wanted})
        if body.stream_events:
            raise InvalidInputs("stream_events answers NDJSON; it cannot be combined with Accept: image/*")
        result = await in_flight.generate(engine, generation.Generation(body, await hub.for_request(body)))
        headers = {"X-Seed": str(result.seeds[0]), "X-Model": str(result.meta.get("MODEL_ID", ""))}
        return Response(result.images[0], media_type=mime_type(result.image_format), headers=headers)
    return await run_request(engine, hub, body, _native_body, native_error, in_flight)


def _native_body(result: GenerateResult) -> dict[str, Any]:
    return GenerateResponse.from_result(result).model_dump()


@router.get("/models", responses=errors(401), summary="Loaded and cached models")
async def models(engine: EngineDep) -> JSONResponse:
    """Resident models (most recently used first, with their weight bytes), models on disk in MODELS_DIR,
    and the memory budget that bounds the resident ones."""
    return JSONResponse(engine.models())


# --- health ------------------------------------------------------------------------------------------------


@health_router.get(
    "/health",
    summary="Lifecycle state; 503 until the model is ready",
    responses={200: {"model": HealthBody}, 503: {"model": HealthBody, "description": "Not serving (yet)"}},
)
async def health(engine: EngineDep) -> JSONResponse:
    state = engine.health
    body: dict[str, Any] = {"status": state.value, "queue_depth": engine.queue_depth}
    if engine.setup_error:
        body["error"] = engine.setup_error
    stats = engine.stats()
    if stats is not None:
        body |= stats.summary()
    memory = probe_device_memory(state)
    if memory is not None:
        body["device_memory"] = memory
    return JSONResponse(body, status_code=200 if state.serving else 503)


@health_router.get(
    "/healthcheck",
    summary="docker-diffusers-api health check",
    responses={200: {"model": LegacyHealth}, 503: {"model": LegacyHealth, "description": "Not serving (yet)"}},
)
async def healthcheck(engine: EngineDep) -> JSONResponse:
    state = engine.health
    serving = state.serving
    body = {"state": "healthy" if serving else state.value.lower(), "gpu": _gpu(state)}
    return JSONResponse(body, status_code=200 if serving else 503)


def _gpu(state: Health) -> bool | None:
    """Whether a CUDA device is available; None (unknown yet) while the model loads. The server answers probes
    before torch is imported, on the engine's thread: importing it here would block the event loop until that
    import is done, and a half-imported torch has no `cuda` yet."""
    if state is Health.STARTING:
        return None
    import torch

    return bool(torch.cuda.is_available())


@health_router.get(
    "/ping",
    summary="RunPod load-balancer probe: 200 ready, 204 initializing",
    responses={
        200: {"model": Ping},
        204: {"description": "Initializing: the model is loading"},
        503: {"model": Ping, "description": "The model failed to load, or the device failed"},
    },
)
async def ping(engine: EngineDep) -> Response:
    state = engine.health
    if state.serving:
        return JSONResponse({"status": "healthy"})
    if state is Health.STARTING:
        return Response(status_code=204)
    return JSONResponse({"status": state.value.lower()}, status_code=503)
