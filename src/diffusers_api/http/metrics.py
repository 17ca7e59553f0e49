"""`GET /metrics`: Prometheus text, behind API_KEY like the inference routes; health probes stay open."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from .app import require_api_key

router = APIRouter(tags=["operations"], dependencies=[Depends(require_api_key)])


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests, latency per stage, queue depth, batch sizes, GPU memory",
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(request: Request) -> Response:
    """The exposition of `app.state.metrics` (see diffusers_api.metrics). A plain function: FastAPI runs it on
    its thread pool, so the first scrape's import of prometheus_client never holds up the event loop."""
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
