"""Jobs: a request queued to run in the background, whose status and progress are read later, or cancelled.

A job is the same request as `POST /v1/generate`, run by the same path (`generation.generate`, so webhooks and
the batching engine behave the same), in a task of the server's event loop instead of inside an HTTP request;
or a training (`POST /v1/train`, `generation.train`), whose result says where the trained weights went.
The HTTP routes over them are in http/jobs.py:

    POST   /v1/jobs              -> 202 {"id", "status": "IN_QUEUE", ...}, Location: /v1/jobs/{id}
    GET    /v1/jobs/{id}         -> status (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED), progress
                                    (stage, step, steps, eta_s) and, once COMPLETED, the images
    DELETE /v1/jobs/{id}         -> cancels: a queued job never starts, a running one stops at the next
                                    denoising step and frees its rows of the batch
    GET    /v1/jobs/{id}/events  -> server-sent events: the status, each event of the job, the final status

With API_KEY set every route needs `Authorization: Bearer <API_KEY>`, except that the events of a job may also
be read with the token in its `events_url` (`?token=`): a browser's EventSource cannot send headers. The token is
an HMAC of the job's id under API_KEY, so it opens that one job's stream and nothing else, and needs no storage.

Jobs live in this process's memory: a restart forgets them. A finished job stays readable for JOBS_TTL_S, and
at most JOBS_KEPT finished jobs are kept (the oldest go first); after that its id answers NO_SUCH_JOB.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import Busy, Cancelled, DiffusersAPIError, InvalidInputs, NoSuchJob, NotReady, from_exception
from .generation import Generation, generate, train
from .schema import GenerateRequest, GenerateResponse, GenerateResult, JobProgress, JobState, JobStatus
from .schema.train import TrainRequest, TrainResult

if TYPE_CHECKING:
    from .config import Settings
    from .engine import Engine
    from .events import Event, EventHub, EventQueue, RequestEvents

_TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
END_OF_JOB = {"type": "job", "status": "end"}  # handed to watchers once the job has ended


@dataclass(eq=False)
class Job:
    id: str
    request: GenerateRequest | TrainRequest | None  # dropped once the job ends: input images can be large
    events: RequestEvents
    events_url: str
    status: JobState = "IN_QUEUE"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result: GenerateResult | TrainResult | None = None
    error: DiffusersAPIError | None = None
    task: asyncio.Task[None] | None = None
    generation: Generation | None = None  # its way through the engine
    stop: threading.Event = field(default_factory=threading.Event)  # set: the denoising or training stops
    watchers: list[EventQueue] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    ended: float | None = None  # clock() at the end, for expiry
    debug: bool = False  # DEBUG: the error carries its stack

    @property
    def finished(self) -> bool:
        return self.status in _TERMINAL

    def publish(self, event: Event) -> None:
        """A sink of the job's events (any thread): every watcher of /events gets it."""
        for watcher in list(self.watchers):
            watcher(event)

    def start(self) -> None:
        """On the event loop: the engine took the request off its queue."""
        if self.status == "IN_QUEUE":
            self.status, self.started_at = "IN_PROGRESS", time.time()

    def end(
        self,
        status: JobState,
        result: GenerateResult | TrainResult | None = None,
        error: DiffusersAPIError | None = None,
    ) -> None:
        """On the event loop. The first end wins: a job cancelled while its result was on the way stays
        CANCELLED."""
        if self.finished:
            return
        self.status, self.result, self.error, self.request = status, result, error, None
        self.finished_at, self.ended = time.time(), self.clock()
        self.publish(END_OF_JOB)

    def cancelled(self) -> None:
        """End as CANCELLED, with the step it had reached."""
        step = int((self.events.latest or {}).get("step", 0))
        self.end("CANCELLED", error=Cancelled(f"job {self.id} was cancelled", step=step))

    def describe(self, with_result: bool = True) -> dict[str, Any]:
        body = JobStatus(
            id=self.id,
            status=self.status,
            events_url=self.events_url,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            progress=JobProgress(**self._progress()),
            result=self._result() if with_result else None,
            error=self.error.to_wire(self.debug) if self.error else None,
        )
        return body.model_dump(exclude_none=True)

    def _result(self) -> GenerateResponse | TrainResult | None:
        if isinstance(self.result, GenerateResult):
            return GenerateResponse.from_result(self.result)
        return self.result

    def _progress(self) -> dict[str, Any]:
        latest = dict(self.events.latest or {})
        if self.status == "COMPLETED":
            stage = "done"
        elif self.status == "IN_QUEUE" or self.started_at is None:
            stage = "queued"
        elif not latest:
            stage = "starting"
        else:
            stage = "finishing" if latest["step"] >= latest["steps"] else latest.get("stage", "inference")
        latest["stage"] = stage
        if self.finished:
            latest.pop("eta_s", None)
        return latest


class JobStore:
    """The jobs of this process, oldest first."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = settings.jobs_ttl_s
        self.kept = settings.jobs_kept
        self.api_key = settings.api_key.get_secret_value() if settings.api_key else None
        self.capacity = settings.max_queue + settings.max_batch_size  # unfinished jobs, like the engine's bound
        self.clock = clock
        self.settings = settings
        self.debug = settings.debug
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    async def submit(self, engine: Engine, hub: EventHub, request: GenerateRequest) -> Job:
        if request.stream_events:
            raise InvalidInputs("stream_events does not apply to jobs: read GET /v1/jobs/{id}/events instead")
        job = await self._new_job(engine, hub, request)
        loop = asyncio.get_running_loop()

        def on_start() -> None:  # on the engine's thread
            loop.call_soon_threadsafe(job.start)

        assert isinstance(job.request, GenerateRequest)
        generation = job.generation = Generation(job.request, job.events, cancel=job.stop, on_start=on_start)
        job.task = asyncio.create_task(self._finish(job, lambda: generate(engine, generation)), name=f"job-{job.id}")
        return job

    async def submit_training(self, engine: Engine, hub: EventHub, request: TrainRequest) -> Job:
        """Queue a training: it runs alone on the device when its turn comes (engine.run_alone). A bad dest_url
        or a name in use is refused here, before the job exists."""
        from .training import check_name_free, destination

        destination(request, self.settings)
        check_name_free(request, self.settings)
        job = await self._new_job(engine, hub, request)
        loop = asyncio.get_running_loop()

        def on_start() -> None:  # on the engine's thread
            loop.call_soon_threadsafe(job.start)

        assert isinstance(job.request, TrainRequest)
        training = job.request

        def work() -> Awaitable[TrainResult]:
            return train(engine, training, job.events, self.settings, job.stop, on_start)

        job.task = asyncio.create_task(self._finish(job, work), name=f"train-{job.id}")
        return job

    async def _new_job(self, engine: Engine, hub: EventHub, request: GenerateRequest | TrainRequest) -> Job:
        if not engine.health.serving:
            raise NotReady(f"the server is {engine.health.value.lower()}", state=engine.health.value)
        job_id = uuid.uuid4().hex
        if request.request_id is None:  # events and meta carry the job's id
            request = request.model_copy(update={"request_id": job_id})
        emitter = await hub.for_request(request)  # may wait on DNS (the request's SEND_URL): count after it
        self._forget_old()
        unfinished = self.unfinished
        if unfinished >= self.capacity:
            raise Busy(f"{unfinished} jobs are queued or running; try again shortly", queue_depth=unfinished)
        job = Job(job_id, request, emitter, events_url(job_id, self.api_key), clock=self.clock, debug=self.debug)
        job.events.sinks.append(job.publish)
        self._jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job:
        self._forget_old()
        job = self._jobs.get(job_id)
        if job is None:
            raise NoSuchJob(f"no job {job_id!r}: unknown, or finished more than JOBS_TTL_S ago", job_id=job_id)
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; a finished one is left as it is."""
        job = self.get(job_id)
        if not job.finished and job.task is not None:
            job.stop.set()  # a running request or training stops at the next step
            job.task.cancel()  # a queued one never starts
            job.cancelled()
        return job

    def cancel_all(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.finished:
                job.task.cancel()

    @property
    def unfinished(self) -> int:
        return sum(not job.finished for job in self._jobs.values())

    async def cancel_unfinished(self) -> int:
        """Cancel every queued or running job and wait until each has ended, so that its webhook and its event
        streams have had their last event (the drain at shutdown). Returns how many there were."""
        jobs = [job for job in self._jobs.values() if not job.finished]
        for job in jobs:
            self.cancel(job.id)
        tasks = [job.task for job in jobs if job.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        return len(jobs)

    async def _finish(self, job: Job, work: Callable[[], Awaitable[GenerateResult | TrainResult]]) -> None:
        try:
            result = await work()
        except asyncio.CancelledError:
            job.cancelled()
        except Exception as exc:
            job.end("FAILED", error=from_exception(exc))
        else:
            job.start()  # the start may still be on its way from the engine's thread
            job.end("COMPLETED", result=result)

    def _forget_old(self) -> None:
        now = self.clock()
        finished = [job for job in self._jobs.values() if job.ended is not None]
        excess = len(finished) - self.kept
        for job in finished:  # oldest first
            if excess > 0 or now - job.ended > self.ttl_s:  # type: ignore[operator]
                del self._jobs[job.id]
                excess -= 1


def events_token(api_key: str, job_id: str) -> str:
    """The token that opens job `job_id`'s event stream alone."""
    return hmac.new(api_key.encode(), f"job-events:{job_id}".encode(), hashlib.sha256).hexdigest()


def events_url(job_id: str, api_key: str | None) -> str:
    url = f"/v1/jobs/{job_id}/events"
    return f"{url}?token={events_token(api_key, job_id)}" if api_key else url
