"""How the HTTP routes answer: errors in the project's format, and a request's result as JSON or NDJSON."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from ..errors import DiffusersAPIError, InvalidInputs, MethodNotAllowed, NotFound
from ..events import EventQueue, ndjson_stream
from ..generation import Generation, InFlight
from .openapi import INFERENCE_ERRORS, NDJSON, Responses, errors

if TYPE_CHECKING:
    from ..engine import Engine
    from ..events import EventHub
    from ..schema import AnyRequest, GenerateResult


def error_body(path: str, error: DiffusersAPIError, debug: bool = False) -> dict[str, Any]:
    """`{"error": {...}}` on the native API (/v1), `{"$error": {...}}` on the legacy one."""
    key = "error" if path.startswith("/v1") else "$error"
    return {key: error.to_wire(debug)}


def native_error(error: DiffusersAPIError, debug: bool = False) -> dict[str, Any]:
    """The error body of the native API (/v1): `{"error": {...}}`."""
    return {"error": error.to_wire(debug)}


def error_response(path: str, error: DiffusersAPIError, debug: bool = False) -> JSONResponse:
    return JSONResponse(error_body(path, error, debug), status_code=error.status)


def http_exception_response(request: Request, exc: HTTPException, debug: bool = False) -> JSONResponse:
    """Starlette's and FastAPI's own errors (no route, a method the route does not take, a body that cannot be
    read) in the project's format, with their headers (a 405's `Allow`)."""
    error = _from_http_exception(request, exc)
    headers = dict(exc.headers or {})
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = ", ".join(error.extra["allowed"])
    return JSONResponse(error_body(request.url.path, error, debug), status_code=error.status, headers=headers)


def _from_http_exception(request: Request, exc: HTTPException) -> DiffusersAPIError:
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return NotFound(f"{where}: no such route (the API is described at /docs)")
    if exc.status_code == 405:
        allowed = allowed_methods(request, exc)
        return MethodNotAllowed(f"{where}: this path answers {', '.join(allowed)} only", allowed=allowed)
    if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not read the body (not UTF-8, ...)
        return InvalidInputs(f"request body is not valid JSON: {exc.__cause__}")
    error = DiffusersAPIError(str(exc.detail))  # none other is known to reach here; the status is kept
    error.code, error.status = HTTPStatus(exc.status_code).name, exc.status_code
    return error


def allowed_methods(request: Request, exc: HTTPException) -> list[str]:
    """Every method some route takes on this path. Starlette's `Allow` names those of the first route that has
    the path, and `/` has two: the playground (GET) and the legacy API (POST); so each method is tried on the
    routes (mounts, which take any path under them, answer their own 405s with their own `Allow`)."""
    given = {method.strip() for method in (exc.headers or {}).get("Allow", "").split(",") if method.strip()}
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    for method in _METHODS - given:
        scope = dict(request.scope, method=method)
        if any(route.matches(scope)[0] is Match.FULL for route in routes):
            given.add(method)
    return sorted(given)


_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


async def run_request(
    engine: Engine,
    hub: EventHub,
    request: AnyRequest,
    render: Callable[[GenerateResult], Any],
    render_error: Callable[[DiffusersAPIError, bool], Any],
    in_flight: InFlight,
) -> Response:
    """The one path of both APIs: run `request` on the engine with its events (webhooks), and answer with
    `render(result)` as JSON, or, when it asked for `stream_events`, with NDJSON lines ending in that body (or in
    `render_error(error, DEBUG)`)."""
    if not request.stream_events:
        result = await in_flight.generate(engine, Generation(request, await hub.for_request(request)))
        return JSONResponse(render(result))
    stream = EventQueue()
    events = await hub.for_request(request, extra_sinks=[stream])

    async def work() -> Any:
        return render(await in_flight.generate(engine, Generation(request, events)))

    debug = hub.settings.debug
    lines = ndjson_stream(work(), stream, lambda error: render_error(error, debug))
    return StreamingResponse(lines, media_type="application/x-ndjson")


# --- images as bytes (`Accept: image/*`) -------------------------------------------------------------------

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/jxl": "JXL"}
# The OpenAPI responses of a route that answers JSON, NDJSON or, as Accept asks, the image's bytes.
IMAGE_RESPONSES: Responses = {
    **errors(*INFERENCE_ERRORS),
    200: {"content": {mime: {} for mime in IMAGE_TYPES} | NDJSON},
}


def image_accept(accept: str) -> str | None:
    """The image format an Accept header asks for, if it asks for an image rather than JSON."""
    for part in accept.split(","):
        mime = part.split(";")[0].strip().lower()
        if mime in IMAGE_TYPES:
            return IMAGE_TYPES[mime]
        if mime in ("application/json", "*/*"):
            return None
    return None
