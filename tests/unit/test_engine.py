"""The engines over a fake runner: lifecycle, the DEFUNCT state, and cancellation before a request starts."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from diffusers_api.engine import BatchingEngine, Health, SerialEngine
from diffusers_api.engine.base import BaseEngine
from diffusers_api.errors import Cancelled, NotReady, PipelineError
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


@dataclass
class GatedRunner:
    """A runner whose requests run until `gate` is set (then succeed) or they are cancelled."""

    steps: Any = None
    store: Any = None
    gate: threading.Event = field(default_factory=threading.Event)
    started: int = 0

    def start(self) -> None:
        pass

    def run(self, request: GenerateRequest, progress: Any = None, cancel: threading.Event | None = None) -> Any:
        self.started += 1
        while not self.gate.wait(0.01):
            if cancel is not None and cancel.is_set():
                raise Cancelled("request cancelled")
        return GenerateResult(images=[b""], image_format="PNG", seeds=[0], nsfw=None, meta={})


def test_a_running_and_a_waiting_request_cancelled_together_free_the_engine() -> None:
    """As a drain or two DELETEs in a row do: the running request's slot must not go to the waiting one, whose
    ticket is already cancelled (it used to fail the running request with InvalidStateError and leak the slot)."""
    runner = GatedRunner()
    engine = BatchingEngine(runner, max_batch_size=1, max_queue=4)  # type: ignore[arg-type]

    async def main() -> list[BaseException | GenerateResult]:
        await engine.start()
        running = asyncio.create_task(engine.submit(Generation(GenerateRequest(prompt="a"))))
        while not runner.started:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(engine.submit(Generation(GenerateRequest(prompt="b"))))
        await asyncio.sleep(0.05)  # it waits for the slot the first holds
        running.cancel()
        waiting.cancel()
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        runner.gate.set()
        third = await asyncio.wait_for(engine.submit(Generation(GenerateRequest(prompt="c"))), 10)
        return [*outcomes, third]

    outcomes = asyncio.run(main())
    assert [type(outcome) for outcome in outcomes] == [asyncio.CancelledError, asyncio.CancelledError, GenerateResult]
    assert engine.queue_depth == 0


@dataclass
class LoggingRunner:
    """A runner whose requests take `delay_s` and log when they start and end."""

    delay_s: float = 0.05
    steps: Any = None
    store: Any = None
    log: list[str] = field(default_factory=list)

    def start(self) -> None:
        pass

    def run(self, request: GenerateRequest, progress: Any = None, cancel: threading.Event | None = None) -> Any:
        self.log.append(f"start {request.prompt}")
        threading.Event().wait(self.delay_s)
        self.log.append(f"end {request.prompt}")
        return request.prompt


@pytest.mark.parametrize("kind", ["serial", "batching"])
def test_run_alone_waits_for_the_requests_before_it_and_holds_back_those_after(kind: str) -> None:
    runner = LoggingRunner()
    engine = dict(zip(["serial", "batching"], engines(runner), strict=True))[kind]
    asyncio.run(engine.start())

    def work(given: Any) -> str:
        assert given is runner
        runner.log.append("start alone")
        threading.Event().wait(0.1)
        runner.log.append("end alone")
        return "trained"

    async def main() -> list[Any]:
        before = asyncio.ensure_future(engine.submit(Generation(GenerateRequest(prompt="before"))))
        await asyncio.sleep(0.01)
        alone = asyncio.ensure_future(engine.run_alone(work, threading.Event()))
        await asyncio.sleep(0.01)
        after = engine.submit(Generation(GenerateRequest(prompt="after")))
        return list(await asyncio.gather(before, alone, after))

    assert asyncio.run(main()) == ["before", "trained", "after"]
    assert runner.log == ["start before", "end before", "start alone", "end alone", "start after", "end after"]


def test_cancelling_run_alone_stops_the_work_before_the_device_is_released() -> None:
    runner = LoggingRunner()
    engine = BatchingEngine(runner, max_batch_size=2, max_queue=4)  # type: ignore[arg-type]
    asyncio.run(engine.start())
    cancel = threading.Event()

    def work(given: Any) -> None:
        runner.log.append("start alone")
        while not cancel.wait(0.01):  # a training checks its flag after every step
            pass
        runner.log.append("stopped alone")

    async def main() -> None:
        alone = asyncio.ensure_future(engine.run_alone(work, cancel))
        await asyncio.sleep(0.05)
        after = asyncio.ensure_future(engine.submit(Generation(GenerateRequest(prompt="after"))))
        await asyncio.sleep(0.01)
        alone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await alone
        assert await after == "after"

    asyncio.run(main())
    assert runner.log == ["start alone", "stopped alone", "start after", "end after"]
