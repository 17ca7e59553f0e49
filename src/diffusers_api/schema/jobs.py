"""The job resource of `/v1/jobs` on the wire: its status and progress."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
)

from .response import GenerateResponse

JobState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]


class JobProgress(BaseModel):
    stage: Literal["queued", "starting", "inference", "finishing", "done"] = Field(
        description="queued: waiting for a slot; starting: model, inputs and prompts; inference: denoising; "
        "finishing: decoding and encoding the images; done: completed"
    )
    step: int | None = Field(None, description="Denoising steps done")
    steps: int | None = Field(None, description="Denoising steps in all")
    eta_s: float | None = Field(None, description="Seconds the remaining steps will take at the pace so far")


class JobStatus(BaseModel):
    id: str
    status: JobState
    events_url: str = Field(
        description="The job's server-sent events; with API_KEY set it carries a token that opens this stream alone,"
        " for clients that cannot send an Authorization header (a browser's EventSource)"
    )
    created_at: float = Field(description="Unix time the job was queued")
    started_at: float | None = Field(None, description="Unix time it left the queue")
    finished_at: float | None = Field(None, description="Unix time it ended")
    progress: JobProgress
    result: GenerateResponse | None = Field(None, description="The images, once COMPLETED")
    error: dict[str, Any] | None = Field(None, description="`{code, message, ...}` when FAILED or CANCELLED")
