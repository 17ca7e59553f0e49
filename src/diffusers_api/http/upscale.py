"""`POST /v1/upscale`: one image upscaled by a super-resolution model, answered like `/v1/generate`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from .. import generation
from ..errors import InvalidInputs
from ..imaging import mime_type
from ..schema import GenerateResult, UpscaleRequest, UpscaleResponse
from .deps import EngineDep, EventsDep, InFlightDep, require_api_key
from .responses import IMAGE_RESPONSES, image_accept, native_error, run_request

router = APIRouter(prefix="/v1", tags=["native"], dependencies=[Depends(require_api_key)])


@router.post(
    "/upscale",
    response_model=UpscaleResponse,
    responses=IMAGE_RESPONSES,
    summary="Upscale an image and wait for it",
)
async def upscale(
    body: UpscaleRequest, request: Request, engine: EngineDep, hub: EventsDep, in_flight: InFlightDep
) -> Response:
    """Upscales `image` with the upscaler `model` (Real-ESRGAN x4 by default) on the engine, like a generation,
    and returns it as base64 JSON, or, when `Accept` names an image type (image/png, image/jpeg, image/webp),
    its bytes."""
    wanted = image_accept(request.headers.get("accept", ""))
    if wanted is None:
        return await run_request(engine, hub, body, _upscale_body, native_error, in_flight)
    if body.stream_events:
        raise InvalidInputs("stream_events answers NDJSON; it cannot be combined with Accept: image/*")
    body = body.model_copy(update={"image_format": wanted})
    result = await in_flight.generate(engine, generation.Generation(body, await hub.for_request(body)))
    width, height = result.meta["output_size"]
    headers = {"X-Model": body.model, "X-Width": str(width), "X-Height": str(height)}
    return Response(result.images[0], media_type=mime_type(result.image_format), headers=headers)


def _upscale_body(result: GenerateResult) -> dict[str, Any]:
    return UpscaleResponse.from_result(result).model_dump()
