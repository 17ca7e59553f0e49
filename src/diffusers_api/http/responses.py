"""How the HTTP routes answer: errors in the project's format, and a request's result as JSON or NDJSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..events import EventQueue, ndjson_stream
from ..generation import Generation, generate

if TYPE_CHECKING:
    from ..engine import Engine
    from ..errors import DiffusersAPIError
    from ..events import EventHub
    from ..schema import GenerateRequest, GenerateResult


def error_body(path: str, error: DiffusersAPIError, debug: bool = False) -> dict[str, Any]:
    """`{"error": {...}}` on the native API (/v1), `{"$error": {...}}` on the legacy one."""
    key = "error" if path.startswith("/v1") else "$error"
    return {key: error.to_wire(debug)}


def error_response(path: str, error: DiffusersAPIError, debug: bool = False) -> JSONResponse:
    return JSONResponse(error_body(path, error, debug), status_code=error.status)


async def run_request(
    engine: Engine,
    hub: EventHub,
    request: GenerateRequest,
    render: Callable[[GenerateResult], Any],
    render_error: Callable[[DiffusersAPIError], Any],
) -> Response:
    """The one path of both APIs: run `request` on the engine with its events (webhooks), and answer with
    `render(result)` as JSON, or, when it asked for `stream_events`, with NDJSON lines ending in that body."""
    if not request.stream_events:
        result = await generate(engine, Generation(request, await hub.for_request(request)))
        return JSONResponse(render(result))
    stream = EventQueue()
    events = await hub.for_request(request, extra_sinks=[stream])

    async def work() -> Any:
        return render(await generate(engine, Generation(request, events)))

    lines = ndjson_stream(work(), stream, render_error)
    return StreamingResponse(lines, media_type="application/x-ndjson")
