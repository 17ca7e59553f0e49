"""Events: signed webhooks, throttled progress and NDJSON streams, shared by every transport.

An event is a small JSON object:

    {"type": "inference", "status": "start" | "progress" | "done" | "error",
     "container_id": "...", "startRequestId": "...", "time": <unix ms>, "payload": {...}}

`type` is the stage (`init` at boot, `inference` per request); progress events are `status: "progress"` with
`payload: {"stage", "step", "steps"}`. They go to sinks: the webhook `SEND_URL`, an NDJSON stream, RunPod's
`progress_update`. Sinks are called on whatever thread produced the event (progress comes from the device
worker thread), so every sink hands the event off at once and never does I/O on the caller's thread.

Webhooks are delivered by one background thread from a bounded queue, with a timeout per attempt and retries
with backoff for lifecycle events (a progress event is stale by the time a retry would land, so it is tried
once). A hanging or down receiver therefore costs queue slots, never inference time. With a SIGN_KEY each body
is signed (see `signature`); receivers check it with `diffusers_api.client.verify_webhook`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import DiffusersAPIError, from_exception

if TYPE_CHECKING:
    from .config import Settings
    from .schema import AnyRequest
    from .schema.train import TrainRequest

log = logging.getLogger(__name__)

Event = dict[str, Any]
Sink = Callable[[Event], None]
"""Receives events; must return at once (hand off, never block)."""

SIGNATURE_HEADER = "X-Diffusers-Api-Signature"
TIMESTAMP_HEADER = "X-Diffusers-Api-Timestamp"


# --- signatures ----------------------------------------------------------------------------------------------


def signature(key: str, timestamp: str, body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256 of `<timestamp>.<body>` under `key`. The timestamp is signed with the body
    so that a captured webhook cannot be replayed later with a fresh timestamp."""
    digest = hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def signed_headers(key: str | None, body: bytes, now: float | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "diffusers-api"}
    if key:
        timestamp = str(int(now if now is not None else time.time()))
        headers[TIMESTAMP_HEADER] = timestamp
        headers[SIGNATURE_HEADER] = signature(key, timestamp, body)
    return headers


def verify_signature(
    key: str, body: bytes, headers: Mapping[str, str], tolerance_s: float = 300, now: float | None = None
) -> bool:
    """True when `headers` carry a valid signature of `body` under `key`, made within `tolerance_s`."""
    lowered = {name.lower(): value for name, value in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or not given:
        return False
    age = (now if now is not None else time.time()) - int(timestamp)
    if abs(age) > tolerance_s:
        return False
    return hmac.compare_digest(given, signature(key, timestamp, body))


# --- webhook delivery ----------------------------------------------------------------------------------------


@dataclass
class _Delivery:
    url: str
    body: bytes
    key: str | None
    attempts: int
    guarded: bool  # a request's own URL: connect to public addresses only (outbound.http_client)


class WebhookSender:
    """Posts events from one background thread. `send` never blocks: when the queue is full the event is
    dropped (and counted) rather than letting a slow receiver push back on inference."""

    def __init__(self, timeout_s: float = 5.0, retries: int = 3, queue_size: int = 256, backoff_s: float = 0.5):
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.dropped = 0
        self.delivered = 0
        self._queue: queue.Queue[_Delivery] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._clients: dict[bool, Any] = {}  # guarded or not -> httpx client, used by the delivery thread only

    def send(self, url: str, event: Event, key: str | None, guarded: bool = False) -> None:
        attempts = 1 if event.get("status") == "progress" else 1 + self.retries
        delivery = _Delivery(url, json.dumps(event).encode(), key, attempts, guarded)
        self._ensure_thread()
        try:
            self._queue.put_nowait(delivery)
        except queue.Full:
            self.dropped += 1
            log.warning("webhook queue full (%d): dropped a %s event", self._queue.maxsize, event.get("type"))

    def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the queue to drain (used at exit); True when it did."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver_forever, name="webhooks", daemon=True)
                self._thread.start()

    def _deliver_forever(self) -> None:
        while True:
            delivery = self._queue.get()
            try:
                self._deliver(delivery)
            finally:
                self._queue.task_done()

    def _deliver(self, delivery: _Delivery) -> None:
        for attempt in range(delivery.attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                self._post(delivery)
                self.delivered += 1
                return
            except Exception as exc:  # any failure of the receiver is its own; log and retry
                log.warning(
                    "webhook to %s failed (attempt %d/%d): %s", delivery.url, attempt + 1, delivery.attempts, exc
                )

    def _post(self, delivery: _Delivery) -> None:
        """One attempt. Redirects are not followed: a 3xx answer is a failed delivery, like a 4xx or 5xx."""
        headers = signed_headers(delivery.key, delivery.body)
        response = self._client(delivery.guarded).post(delivery.url, content=delivery.body, headers=headers)
        response.raise_for_status()

    def _client(self, guarded: bool) -> Any:
        if guarded not in self._clients:
            from .outbound import http_client

            self._clients[guarded] = http_client(guarded, "SEND_URL", timeout=self.timeout_s)
        return self._clients[guarded]


# --- progress ------------------------------------------------------------------------------------------------


@dataclass
class ProgressThrottle:
    """Decides which denoising steps get a progress event: every `every_steps` steps when the request set
    callback_steps, else at most one per `min_interval_s`. The first and the last step always pass."""

    every_steps: int | None = None
    min_interval_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _last_step: int = 0
    _last_time: float | None = None

    def should_emit(self, step: int, steps: int) -> bool:
        now = self.clock()
        if self.every_steps is not None:
            due = step - self._last_step >= self.every_steps
        else:
            due = self._last_time is None or now - self._last_time >= self.min_interval_s
        if not (due or step >= steps):
            return False
        self._last_step, self._last_time = step, now
        return True


# --- per-process hub and per-request emitters --------------------------------------------------------------


@dataclass
class RequestEvents:
    """The events of one request (or of boot, for `init`): stamps them and hands them to every sink."""

    sinks: list[Sink]
    container_id: str
    request_id: str | None = None
    throttle: ProgressThrottle = field(default_factory=ProgressThrottle)
    stage: str = "inference"
    clock: Callable[[], float] = time.monotonic
    _first_step: tuple[float, int] | None = None  # (time, step) of the first progress report, for the ETA
    latest: dict[str, Any] | None = None  # the newest progress (step, steps, eta_s), unthrottled

    def emit(self, type_: str, status: str, **payload: Any) -> None:
        event: Event = {
            "type": type_,
            "status": status,
            "container_id": self.container_id,
            "startRequestId": self.request_id,
            "time": int(time.time() * 1000),
            "payload": payload,
        }
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not fail the request it reports on
                log.exception("event sink failed")

    def progress(self, step: int, steps: int) -> None:
        """The runner's progress callback (called on the device thread): step, steps and, from the second
        step on, `eta_s`, the seconds the remaining steps will take at the pace seen so far."""
        eta = self._eta(step, steps)
        extra = {} if eta is None else {"eta_s": eta}
        self.latest = {"stage": self.stage, "step": step, "steps": steps, **extra}
        if self.throttle.should_emit(step, steps):
            self.emit(self.stage, "progress", stage=self.stage, step=step, steps=steps, **extra)

    def _eta(self, step: int, steps: int) -> float | None:
        now = self.clock()
        if self._first_step is None or step <= self._first_step[1]:
            self._first_step = (now, step)
            return None
        started, first = self._first_step
        return round((now - started) / (step - first) * (steps - step), 2)


class EventHub:
    """One per process: the webhook sender and the defaults (SEND_URL, SIGN_KEY) from the settings.

    `request_sinks` make one more sink for each request (the HTTP server's metrics add theirs here)."""

    def __init__(self, settings: Settings, sender: WebhookSender | None = None) -> None:
        self.settings = settings
        self.sender = sender or WebhookSender(
            settings.webhook_timeout_s, settings.webhook_retries, settings.webhook_queue_size
        )
        self.request_sinks: list[Callable[[], Sink]] = []

    def for_boot(self) -> RequestEvents:
        return RequestEvents(self._webhook_sinks(None, None), self.settings.container_id)

    async def for_request(
        self, request: AnyRequest | TrainRequest, extra_sinks: list[Sink] | None = None
    ) -> RequestEvents:
        """The emitter of one request. A request's own SEND_URL is checked first; the check resolves its host,
        on a worker thread, so that a slow DNS server holds up this request only, never the event loop."""
        if request.send_url:
            await asyncio.to_thread(self._check_request_url, request.send_url)
        key = request.sign_key.get_secret_value() if request.sign_key else None
        sinks = self._webhook_sinks(request.send_url, key) + list(extra_sinks or [])
        sinks += [make_sink() for make_sink in self.request_sinks]
        throttle = ProgressThrottle(request.callback_steps, self.settings.progress_interval_s)
        return RequestEvents(sinks, self.settings.container_id, request.request_id, throttle)

    def _check_request_url(self, url: str) -> None:
        """A request's own SEND_URL must not reach into the server's network: no private, loopback or
        link-local targets unless ALLOW_PRIVATE_URLS is on. The operator's SEND_URL setting is trusted."""
        from .errors import InvalidInputs, StorageError
        from .outbound import check_public_url

        try:
            check_public_url(url, self.settings.allow_private_urls, "SEND_URL")
        except StorageError as exc:  # cannot resolve: the request's mistake here, not the storage's
            raise InvalidInputs(exc.message, field="SEND_URL") from None

    def _webhook_sinks(self, url: str | None, key: str | None) -> list[Sink]:
        """The webhook sink for a request's own SEND_URL (its connections guarded: public addresses only, unless
        ALLOW_PRIVATE_URLS), else for the operator's SEND_URL setting, which is trusted."""
        guarded = bool(url) and not self.settings.allow_private_urls
        url = url or self.settings.send_url
        if not url:
            return []
        if key is None and self.settings.sign_key is not None:
            key = self.settings.sign_key.get_secret_value()
        sender, target, sign_with = self.sender, url, key
        return [lambda event: sender.send(target, event, sign_with, guarded)]


# --- NDJSON --------------------------------------------------------------------------------------------------


class EventQueue:
    """A sink that moves events from any thread onto the event loop that streams them."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        # On the loop's own thread the event goes in at once: `inference done` is emitted just before the work
        # finishes, and a deferred put would land after the stream had already written its last line.
        if threading.get_ident() == self.loop_thread:
            self.queue.put_nowait(event)
        else:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def ndjson_line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def ndjson_stream(
    work: Awaitable[Any], events: EventQueue, on_error: Callable[[DiffusersAPIError], Any]
) -> AsyncIterator[bytes]:
    """Yield each event as a line while `work` runs, then its result (or `on_error(error)`) as the last line.
    If the client goes away the work is cancelled, which stops the request at the next denoising step."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            getter = asyncio.ensure_future(events.queue.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield ndjson_line(getter.result())
            else:
                getter.cancel()
        while not events.queue.empty():  # events handed over just before the work finished
            yield ndjson_line(events.queue.get_nowait())
        yield ndjson_line(_outcome(task, on_error))
    finally:
        task.cancel()


def _outcome(task: asyncio.Future[Any], on_error: Callable[[DiffusersAPIError], Any]) -> Any:
    error = task.exception()
    if error is None:
        return task.result()
    return on_error(from_exception(error))
