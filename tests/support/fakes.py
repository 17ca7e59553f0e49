"""Fakes (not mocks) that stand in for the device: engines with one behaviour each."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from PIL import Image

from diffusers_api.denoising import SharedSteps, StepStats
from diffusers_api.denoising.tasks import ProgressCallback
from diffusers_api.engine import Health
from diffusers_api.errors import DiffusersAPIError, NotReady
from diffusers_api.generation import Generation
from diffusers_api.schema import GenerateRequest, GenerateResult


def png_bytes(color: tuple[int, int, int] = (0, 128, 0), size: int = 8) -> bytes:
    return image_bytes("PNG", color, size)


def image_bytes(image_format: str, color: tuple[int, int, int] = (0, 128, 0), size: int = 8) -> bytes:
    from diffusers_api.imaging import encode_image

    return encode_image(Image.new("RGB", (size, size), color), image_format)  # JXL: through its plugin


@dataclass
class FakeEngine:
    """Answers every request with solid-colour images in the format it asked for, one per image, seeds counting
    up from the request's. With `shared`, it reports their (real, idle) counters as the batching engine does."""

    health: Health = Health.READY
    setup_error: str | None = None
    fail_with: DiffusersAPIError | None = None
    queued_s: float = 0.0  # time in the queue, before on_start
    delay_s: float = 0.0  # time running, before the steps are reported
    steps: int = 0  # denoising steps reported to the progress callback (from a thread, as the real engine does)
    requests: list[GenerateRequest] = field(default_factory=list)
    queue_depth: int = 0
    started: bool = False
    shared: SharedSteps | None = None  # the batching engine's steps (their counters)

    def stats(self) -> StepStats | None:
        return self.shared.stats() if self.shared is not None else None

    def schedulers(self) -> dict[str, object]:
        raise NotReady("no model is loaded yet")  # a fake has no model to list the schedulers of

    def models(self) -> dict[str, object]:
        return {"loaded": [{"model_id": "fake"}], "cached": [], "memory_budget_bytes": None}

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        pass

    async def submit(self, generation: Generation) -> GenerateResult:
        request, progress, on_start = generation.request, generation.events.progress, generation.on_start
        self.requests.append(request)
        if self.queued_s:
            await asyncio.sleep(self.queued_s)
        if on_start is not None:
            await asyncio.to_thread(on_start)  # on another thread, as the real engines call it
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if progress is not None and self.steps:
            await asyncio.to_thread(_report_steps, progress, self.steps)
        if self.fail_with is not None:
            raise self.fail_with
        count = request.image_count
        seed = request.seed if request.seed is not None else 42
        return GenerateResult(
            images=[image_bytes(request.image_format) for _ in range(count)],
            image_format=request.image_format,
            seeds=[seed + i for i in range(count)],
            nsfw=[False] * count,
            meta={
                "MODEL_ID": request.model or "fake",
                "PIPELINE": "Fake",
                "SCHEDULER": "Fake",
                "seed": seed,
                "image_format": request.image_format,
            },
            timings={"inference": 1.0},
        )


def _report_steps(progress: ProgressCallback, steps: int) -> None:
    for step in range(1, steps + 1):
        progress(step, steps)
