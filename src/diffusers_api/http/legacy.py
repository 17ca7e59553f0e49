"""`POST /`: the docker-diffusers-api envelope, adapted onto the native request."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..errors import DiffusersAPIError
from ..schema import decode_envelope, from_legacy_envelope, legacy_envelope_schema, to_legacy
from .deps import EngineDep, EventsDep, InFlightDep, require_api_key
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
async def legacy_inference(request: Request, engine: EngineDep, hub: EventsDep, in_flight: InFlightDep) -> Response:
    """Accepts `{"modelInputs": {...}, "callInputs": {...}}` (also double-encoded as a JSON string) and answers
    with `image_base64` / `images_base64`, `$meta`, `$timings` and `$mem_usage`; errors as `$error`. With
    `callInputs.streamEvents` the answer is NDJSON: events and progress, then that body as the last line. With
    `callInputs.use_extra: "upsample"`, `modelInputs.input_image` is upscaled instead (as `POST /v1/upscale`)."""
    legacy_request = from_legacy_envelope(decode_envelope(await request.body()))  # a generation, or an upscale
    return await run_request(engine, hub, legacy_request, to_legacy, _legacy_error, in_flight)


def _legacy_error(error: DiffusersAPIError, debug: bool = False) -> dict[str, Any]:
    return {"$error": error.to_wire(debug)}
