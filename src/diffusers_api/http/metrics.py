"""`GET /metrics`: Prometheus text, behind API_KEY like the inference routes; health probes stay open."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from .deps import MetricsDep, require_api_key
from .openapi import errors

router = APIRouter(tags=["operations"], dependencies=[Depends(require_api_key)])


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests, latency per stage, queue depth, batch sizes, GPU memory",
    responses={200: {"content": {"text/plain": {}}}, **errors(401)},
)
def metrics(metrics: MetricsDep) -> Response:
    """The exposition of the app's metrics (see diffusers_api.metrics). A plain function: FastAPI runs it on
    its thread pool, so the first scrape's import of prometheus_client never holds up the event loop."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
