"""`POST /`: the docker-diffusers-api envelope, adapted onto the native request."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..errors import DiffusersAPIError
from ..schema import (
    decode_envelope,
    from_legacy_envelope,
    is_training,
    legacy_envelope_schema,
    to_legacy,
    to_legacy_training,
    train_from_legacy,
)
from ..schema.train import TrainResult
from .deps import EngineDep, EventsDep, InFlightDep, JobsDep, require_api_key
from .openapi import INFERENCE_ERRORS, NDJSON, LegacyResponse, errors
from .responses import run_request

router = APIRouter(tags=["legacy"], dependencies=[Depends(require_api_key)])

_ENVELOPE_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": legacy_envelope_schema(ref_template="#/components/schemas/{model}"),
                # No MODEL_ID: the example runs as it is on whatever model the server serves.
                "example": {
                    "modelInputs": {"prompt": "realistic field of grass", "num_inference_steps": 20, "seed": 42},
                    "callInputs": {"SCHEDULER": "DPMSolverMultistepScheduler"},
                },
            }
        },
    }
}


@router.post(
    "/",
    summary="docker-diffusers-api compatible inference",
    openapi_extra=_ENVELOPE_SCHEMA,
    responses={200: {"model": LegacyResponse, "content": NDJSON}, **errors(*INFERENCE_ERRORS, legacy=True)},
)
async def legacy_inference(
    request: Request, engine: EngineDep, hub: EventsDep, in_flight: InFlightDep, jobs: JobsDep
) -> Response:
    """Accepts `{"modelInputs": {...}, "callInputs": {...}}` (also double-encoded as a JSON string) and answers
    with `image_base64` / `images_base64`, `$meta`, `$timings` and `$mem_usage`; errors as `$error`. With
    `callInputs.streamEvents` the answer is NDJSON: events and progress, then that body as the last line. With
    `callInputs.use_extra: "upsample"`, `modelInputs.input_image` is upscaled instead (as `POST /v1/upscale`).
    With `callInputs.train: "dreambooth"` it trains (modelInputs are the training arguments) and answers
    `{"done": true, ...}` when the result is uploaded; the training is also a job of /v1/jobs, which goes on if
    the client leaves."""
    envelope = decode_envelope(await request.body())
    if is_training(envelope):
        job = await jobs.submit_training(engine, hub, train_from_legacy(envelope))
        assert job.task is not None
        await asyncio.wait([job.task])  # a client that leaves does not cancel the training
        if job.error is not None:
            return JSONResponse(_legacy_error(job.error, hub.settings.debug), status_code=job.error.status)
        assert isinstance(job.result, TrainResult)
        return JSONResponse(to_legacy_training(job.result))
    legacy_request = from_legacy_envelope(envelope)  # a generation, or an upscale
    return await run_request(engine, hub, legacy_request, to_legacy, _legacy_error, in_flight)


def _legacy_error(error: DiffusersAPIError, debug: bool = False) -> dict[str, Any]:
    return {"$error": error.to_wire(debug)}
