"""The job resource of `/v1/jobs` on the wire: its status and progress."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
)

from .response import GenerateResponse
from .train import TrainResult

JobState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]


class JobProgress(BaseModel):
    stage: Literal["queued", "starting", "inference", "training", "finishing", "done"] = Field(
        description="queued: waiting for a slot; starting: model, inputs and prompts; inference: denoising; "
        "training: optimizer steps (a training job); finishing: decoding and encoding the images (a training: "
        "saving, packing and uploading); done: completed"
    )
    step: int | None = Field(None, description="Denoising (or training) steps done")
    steps: int | None = Field(None, description="Denoising (or training) steps in all")
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
    result: GenerateResponse | TrainResult | None = Field(
        None, description="The images, once COMPLETED (a training: what it made and where it went)"
    )
    error: dict[str, Any] | None = Field(None, description="`{code, message, ...}` when FAILED or CANCELLED")
