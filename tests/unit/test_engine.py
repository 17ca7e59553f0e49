"""The engines over a fake runner: lifecycle, the DEFUNCT state, and cancellation before a request starts."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from diffusers_api.engine import BatchingEngine, Health, SerialEngine
from diffusers_api.engine.base import BaseEngine
from diffusers_api.errors import NotReady, PipelineError
from diffusers_api.generation import Generation
from diffusers_api.schema import GenerateRequest, GenerateResult


@dataclass
class FailingRunner:
    """A runner whose requests fail with `error` (raised from `cause`, as the real runner wraps failures)."""

    cause: BaseException
    steps: Any = None
    store: Any = None
    calls: list[GenerateRequest] = field(default_factory=list)

    def start(self) -> None:
        pass

    def run(self, request: GenerateRequest, progress: Any = None, cancel: threading.Event | None = None) -> Any:
        self.calls.append(request)
        raise PipelineError(f"{type(self.cause).__name__}: {self.cause}") from self.cause


def engines(runner: Any) -> list[BaseEngine]:
    return [SerialEngine(runner, max_queue=4), BatchingEngine(runner, max_batch_size=2, max_queue=4)]


def run(engine: BaseEngine, request: GenerateRequest) -> GenerateResult:
    async def main() -> GenerateResult:
        return await engine.submit(Generation(request))

    return asyncio.run(main())


@pytest.mark.parametrize("kind", ["serial", "batching"])
def test_a_fatal_device_error_makes_the_engine_defunct(kind: str) -> None:
    runner = FailingRunner(RuntimeError("CUDA error: an illegal memory access was encountered"))
    engine = dict(zip(["serial", "batching"], engines(runner), strict=True))[kind]
    asyncio.run(engine.start())
    assert engine.health is Health.READY
    with pytest.raises(PipelineError, match="illegal memory access"):
        run(engine, GenerateRequest(prompt="a"))
    assert engine.health is Health.DEFUNCT
    with pytest.raises(NotReady, match="defunct"):
        run(engine, GenerateRequest(prompt="b"))
    assert len(runner.calls) == 1  # the second request never reached the device


def test_an_ordinary_failure_leaves_the_engine_ready() -> None:
    runner = FailingRunner(ValueError("height must be divisible by 8"))
    engine = SerialEngine(runner, max_queue=4)  # type: ignore[arg-type]
    asyncio.run(engine.start())
    with pytest.raises(PipelineError):
        run(engine, GenerateRequest(prompt="a"))
    assert engine.health is Health.READY


def test_a_request_cancelled_before_it_starts_never_runs() -> None:
    runner = FailingRunner(ValueError("unused"))
    engine = SerialEngine(runner, max_queue=4)  # type: ignore[arg-type]
    asyncio.run(engine.start())
    generation = Generation(GenerateRequest(prompt="a"))
    generation.cancel.set()

    async def main() -> None:
        await engine.submit(generation)

    with pytest.raises(Exception, match="cancelled"):
        asyncio.run(main())
    assert runner.calls == []
