"""`/v1/jobs`: thin routes over the job store (diffusers_api.jobs), and each job's events as server-sent events.

    POST   /v1/jobs              -> 202 {"id", "status": "IN_QUEUE", ...}, Location: /v1/jobs/{id}
    POST   /v1/train             -> the same, for a training (schema/train.py)
    GET    /v1/jobs/{id}         -> status, progress and, once COMPLETED, the images
    DELETE /v1/jobs/{id}         -> cancels
    GET    /v1/jobs/{id}/events  -> server-sent events: the status, each event of the job, the final status

With API_KEY set every route needs `Authorization: Bearer <API_KEY>`, except that the events of a job may also
be read with the token in its `events_url` (`?token=`): a browser's EventSource cannot send headers.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import Unauthorized
from ..events import EventQueue
from ..jobs import END_OF_JOB, Job, events_token
from ..schema import GenerateRequest, JobStatus
from ..schema.request import loads_json
from ..schema.train import TrainRequest, parse_train_request
from .deps import EngineDep, EventsDep, JobsDep, SettingsDep, check_api_key, require_api_key
from .openapi import JOB_LINKS, errors

KEEP_ALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])
_ERRORS = errors(401, 404, 422)  # a job's routes; 422 stands in for FastAPI's own (it never has a body to refuse)
_QUEUED_RESPONSES = {202: {"links": JOB_LINKS}, **errors(401, 413, 422, 503)}  # the routes that queue a job


@router.post(
    "",
    status_code=202,
    response_model=JobStatus,
    responses=_QUEUED_RESPONSES,
    summary="Queue a request as a job",
)
async def create_job(body: GenerateRequest, jobs: JobsDep, engine: EngineDep, events: EventsDep) -> JSONResponse:
    """Queues the same request as POST /v1/generate and answers at once with the job's id (also in
    `Location`). Input errors the request's fields show are refused here (422); those found when it runs
    (an unknown model or pipeline, a bad image) end the job FAILED with the same error body."""
    return _queued(await jobs.submit(engine, events, body))


# The body is read by parse_train_request, so that an unknown argument is refused with the list of known ones.
_TRAIN_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": TrainRequest.model_json_schema()}},
    }
}
train_router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(require_api_key)])


@train_router.post(
    "/train",
    status_code=202,
    response_model=JobStatus,
    responses=_QUEUED_RESPONSES,
    summary="Queue a training (DreamBooth: a LoRA, or a full UNet fine-tune) as a job",
    openapi_extra=_TRAIN_BODY,
)
async def create_training(request: Request, jobs: JobsDep, engine: EngineDep, events: EventsDep) -> JSONResponse:
    """Queues a training and answers at once with the job's id (also in `Location`). The job runs alone on the
    device when its turn comes (requests sent meanwhile wait), reports `training` progress per optimizer step,
    then uploads the result to `dest_url` and/or keeps it as `trained/<name>`; its result says where it went.
    `DELETE /v1/jobs/{id}` stops it within a step."""
    return _queued(await jobs.submit_training(engine, events, parse_train_request(loads_json(await request.body()))))


def _queued(job: Job) -> JSONResponse:
    """202 with the new job's status, and its URL in `Location`."""
    return JSONResponse(job.describe(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="A job's status and result")
async def get_job(job_id: str, jobs: JobsDep) -> JSONResponse:
    return JSONResponse(jobs.get(job_id).describe())


@router.delete("/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="Cancel a job")
async def cancel_job(job_id: str, jobs: JobsDep) -> JSONResponse:
    """A queued job never starts; a running one stops at the next denoising step, and the others in its
    batch go on. Cancelling a finished job changes nothing. Answers the job's status."""
    return JSONResponse(jobs.cancel(job_id).describe())


def _may_read_events(job_id: str, request: Request, settings: SettingsDep, token: str | None = None) -> None:
    """FastAPI dependency: API_KEY in the Authorization header, or this job's events token in `?token=`."""
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    if api_key is not None and token is not None:
        if secrets.compare_digest(token, events_token(api_key, job_id)):
            return
        raise Unauthorized("wrong events token: use the events_url of the job, or send 'Authorization: Bearer'")
    check_api_key(request, settings)


# Not behind the router's API key alone: the events token of the job opens its stream too.
events_router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@events_router.get(
    "/{job_id}/events",
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    summary="Server-sent events of a job",
    dependencies=[Depends(_may_read_events)],
)
async def job_events(job_id: str, jobs: JobsDep) -> StreamingResponse:
    """`event: status` with the job's status first, then `event: event` for each event of the job (the
    webhook events: start, throttled progress, done or error), and `event: status` with the final status
    (and the result) once it ends; then the stream closes. Closing the stream does not cancel the job.
    With API_KEY set, `?token=` (the token in the job's `events_url`) opens the stream without a header."""
    job = jobs.get(job_id)
    return StreamingResponse(_sse(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse(job: Job) -> AsyncIterator[bytes]:
    # Watching starts with the stream, so that a client gone before its first byte leaves no watcher behind.
    watcher = EventQueue()
    job.watchers.append(watcher)
    try:
        yield _sse_message("status", job.describe(with_result=False))
        # Events reach the queue in the order they happened, the end last (events.EventQueue), so every event
        # of the job is streamed before its final status.
        while not job.finished or not watcher.queue.empty():
            try:
                event = await asyncio.wait_for(watcher.queue.get(), KEEP_ALIVE_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if event is END_OF_JOB:
                break
            yield _sse_message("event", event)
        yield _sse_message("status", job.describe())
    finally:
        job.watchers.remove(watcher)


def _sse_message(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
