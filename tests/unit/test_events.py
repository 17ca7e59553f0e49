"""Events: signatures, the progress throttle, webhook delivery off the caller's thread, NDJSON streaming."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time

import pytest

from diffusers_api.client import verify_webhook
from diffusers_api.config import Settings
from diffusers_api.errors import InvalidInputs, PipelineError
from diffusers_api.events import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Event,
    EventHub,
    EventQueue,
    ProgressThrottle,
    RequestEvents,
    WebhookSender,
    _Delivery,
    ndjson_stream,
    signed_headers,
)
from diffusers_api.generation import Generation, generate
from diffusers_api.schema import GenerateRequest
from support.fakes import FakeEngine
from support.receiver import receiver

KEY = "webhook-key"


# --- signatures ------------------------------------------------------------------------------------------------


def test_a_signed_body_verifies_and_any_change_breaks_it() -> None:
    body = b'{"type":"init","status":"done"}'
    headers = signed_headers(KEY, body)
    assert headers[SIGNATURE_HEADER].startswith("sha256=")
    assert verify_webhook(KEY, body, headers)
    assert not verify_webhook("other-key", body, headers)
    assert not verify_webhook(KEY, body + b" ", headers)
    forged = headers | {TIMESTAMP_HEADER: str(int(headers[TIMESTAMP_HEADER]) + 1)}
    assert not verify_webhook(KEY, body, forged)


def test_a_stale_or_unsigned_webhook_is_refused() -> None:
    body = b"{}"
    old = signed_headers(KEY, body, now=time.time() - 3600)
    assert not verify_webhook(KEY, body, old)
    assert not verify_webhook(KEY, body, {"Content-Type": "application/json"})
    assert SIGNATURE_HEADER not in signed_headers(None, body)


def test_header_names_are_matched_case_insensitively() -> None:
    body = b"{}"
    lowered = {name.lower(): value for name, value in signed_headers(KEY, body).items()}
    assert verify_webhook(KEY, body, lowered)


# --- the throttle ----------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_callback_steps_emits_every_n_steps_and_the_last() -> None:
    throttle = ProgressThrottle(every_steps=3)
    emitted = [step for step in range(1, 11) if throttle.should_emit(step, 10)]
    assert emitted == [3, 6, 9, 10]


def test_without_callback_steps_progress_is_limited_in_time() -> None:
    clock = FakeClock()
    throttle = ProgressThrottle(min_interval_s=1.0, clock=clock)
    emitted = []
    for step in range(1, 21):
        clock.now = step * 0.25  # four steps a second
        if throttle.should_emit(step, 20):
            emitted.append(step)
    assert emitted == [1, 5, 9, 13, 17, 20]


# --- emitting --------------------------------------------------------------------------------------------------


def test_events_carry_type_status_container_and_request_id() -> None:
    seen: list[Event] = []
    events = RequestEvents([seen.append], container_id="box-1", request_id="req-9")
    events.emit("inference", "start")
    event = seen[0]
    assert (event["type"], event["status"], event["container_id"], event["startRequestId"]) == (
        "inference",
        "start",
        "box-1",
        "req-9",
    )
    assert abs(event["time"] / 1000 - time.time()) < 5


def test_a_failing_sink_does_not_fail_the_request() -> None:
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("sink down")

    RequestEvents([broken, seen.append], container_id="c").emit("init", "start")
    assert len(seen) == 1


def test_generate_reports_start_progress_and_done() -> None:
    seen: list[Event] = []
    events = RequestEvents([seen.append], "c", throttle=ProgressThrottle(every_steps=1))
    result = asyncio.run(generate(FakeEngine(steps=4), Generation(GenerateRequest(prompt="p", seed=3), events)))
    statuses = [(event["type"], event["status"]) for event in seen]
    assert statuses == [("inference", "start")] + [("inference", "progress")] * 4 + [("inference", "done")]
    assert [event["payload"]["step"] for event in seen[1:5]] == [1, 2, 3, 4]
    assert seen[-1]["payload"]["timings"] == result.timings
    assert seen[-1]["payload"]["seeds"] == [3]


def test_progress_carries_an_eta_from_the_pace_so_far() -> None:
    seen: list[Event] = []
    now = [100.0]
    events = RequestEvents([seen.append], "c", throttle=ProgressThrottle(every_steps=1), clock=lambda: now[0])
    for step in range(1, 5):
        events.progress(step, 10)
        now[0] += 0.5  # half a second per step
    payloads = [event["payload"] for event in seen]
    assert "eta_s" not in payloads[0]  # one step tells no pace yet
    assert [p["eta_s"] for p in payloads[1:]] == [4.0, 3.5, 3.0]  # 8, 7, 6 steps left at 0.5 s each


def test_generate_reports_an_error_and_raises_it() -> None:
    seen: list[Event] = []
    engine = FakeEngine(fail_with=PipelineError("boom"))
    with pytest.raises(PipelineError):
        asyncio.run(generate(engine, Generation(GenerateRequest(prompt="p"), RequestEvents([seen.append], "c"))))
    assert seen[-1]["status"] == "error"
    assert seen[-1]["payload"]["error"]["code"] == "PIPELINE_ERROR"


def test_a_cancelled_request_reports_cancelled_to_the_webhook() -> None:
    """A client that leaves (or a cancelled job) must not leave the webhook receiver waiting for an end."""
    seen: list[Event] = []

    async def main() -> None:
        task = asyncio.create_task(
            generate(FakeEngine(delay_s=5), Generation(GenerateRequest(prompt="p"), RequestEvents([seen.append], "c")))
        )
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [event["status"] for event in seen] == ["start", "error"]
    assert seen[-1]["payload"]["error"]["code"] == "CANCELLED"


def test_progress_keeps_the_latest_step_unthrottled() -> None:
    events = RequestEvents([], "c", throttle=ProgressThrottle(min_interval_s=60))
    for step in range(1, 4):
        events.progress(step, 10)
    assert events.latest is not None
    assert (events.latest["step"], events.latest["steps"]) == (3, 10)


def test_the_request_send_url_and_key_override_the_settings() -> None:
    sent: list[tuple[str, str | None]] = []

    class Recorder(WebhookSender):
        def send(self, url: str, event: Event, key: str | None, guarded: bool = False) -> None:
            sent.append((url, key))

    settings = Settings(send_url="http://env/hook", sign_key="env-key", allow_private_urls=True)
    hub = EventHub(settings, sender=Recorder())
    hub.for_boot().emit("init", "start")
    request = GenerateRequest(send_url="http://request/hook", sign_key="request-key")
    asyncio.run(hub.for_request(request)).emit("inference", "start")
    asyncio.run(hub.for_request(GenerateRequest())).emit("inference", "start")
    assert sent == [
        ("http://env/hook", "env-key"),
        ("http://request/hook", "request-key"),
        ("http://env/hook", "env-key"),
    ]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest"],
    ids=["loopback", "localhost", "private", "link-local-metadata"],
)
def test_a_request_send_url_may_not_reach_private_addresses(url: str) -> None:
    with pytest.raises(InvalidInputs, match="ALLOW_PRIVATE_URLS") as caught:
        asyncio.run(EventHub(Settings()).for_request(GenerateRequest(send_url=url)))
    assert caught.value.status == 422
    assert asyncio.run(EventHub(Settings(allow_private_urls=True)).for_request(GenerateRequest(send_url=url))).sinks


def test_an_unresolvable_request_send_url_is_invalid_input() -> None:
    with pytest.raises(InvalidInputs, match="SEND_URL"):
        asyncio.run(EventHub(Settings()).for_request(GenerateRequest(send_url="http://no-such-host.invalid/hook")))


def test_the_servers_own_send_url_is_trusted() -> None:
    assert asyncio.run(EventHub(Settings(send_url="http://127.0.0.1:9/hook")).for_request(GenerateRequest())).sinks


def test_resolving_a_request_send_url_never_blocks_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow DNS server holds up the request that named the host, not every other request and probe."""
    import socket

    def slow_resolver(host: str, *args: object, **kwargs: object) -> list[tuple]:
        time.sleep(0.5)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", slow_resolver)
    ticks: list[float] = []

    async def main() -> None:
        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        events = await EventHub(Settings()).for_request(GenerateRequest(send_url="http://example.test/hook"))
        task.cancel()
        assert events.sinks

    asyncio.run(main())
    assert len(ticks) > 20  # the loop went on ticking while the name resolved
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.25


def test_no_send_url_means_no_webhook_sink() -> None:
    assert asyncio.run(EventHub(Settings()).for_request(GenerateRequest())).sinks == []


# --- delivery --------------------------------------------------------------------------------------------------


def test_webhooks_arrive_signed() -> None:
    sender = WebhookSender(timeout_s=2, retries=0)
    with receiver() as hook:
        sender.send(hook.url, {"type": "init", "status": "done"}, KEY)
        posts = hook.wait_for(lambda posts: posts)
    assert posts[0].json() == {"type": "init", "status": "done"}
    assert verify_webhook(KEY, posts[0].body, posts[0].headers)


def test_a_hanging_receiver_never_blocks_the_sender() -> None:
    sender = WebhookSender(timeout_s=5, retries=0, queue_size=2)
    with receiver(hang=True) as hook:
        started = time.perf_counter()
        for _ in range(10):
            sender.send(hook.url, {"type": "inference", "status": "start"}, None)
        elapsed = time.perf_counter() - started
        hook.wait_for(lambda posts: posts)
    assert elapsed < 0.5
    assert sender.dropped >= 7  # the queue holds 2 and one is in flight: the rest are dropped, not waited for


def test_lifecycle_events_are_retried_progress_events_are_not() -> None:
    attempts: list[str] = []

    class Counting(WebhookSender):
        def _post(self, delivery: _Delivery) -> None:
            attempts.append(json.loads(delivery.body)["status"])
            super()._post(delivery)

    sender = Counting(timeout_s=1, retries=2, backoff_s=0.01)
    down = closed_port_url()  # nothing listens: every attempt fails fast with "connection refused"
    sender.send(down, {"type": "inference", "status": "done"}, None)
    sender.send(down, {"type": "inference", "status": "progress"}, None)
    assert sender.flush(10)
    assert sender.delivered == 0
    assert attempts == ["done", "done", "done", "progress"]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


# --- NDJSON ----------------------------------------------------------------------------------------------------


def test_ndjson_stream_yields_events_then_the_result_last() -> None:
    async def scenario() -> list[dict]:
        stream = EventQueue()
        events = RequestEvents([stream], "c", throttle=ProgressThrottle(every_steps=1))

        async def work() -> dict:
            result = await generate(FakeEngine(steps=3), Generation(GenerateRequest(prompt="p"), events))
            return {"result": result.seeds}

        return [json.loads(line) async for line in ndjson_stream(work(), stream, lambda e: {"$error": e.code})]

    lines = asyncio.run(scenario())
    assert [line.get("status") for line in lines[:-1]] == ["start", "progress", "progress", "progress", "done"]
    assert "result" in lines[-1]


def test_ndjson_stream_ends_with_the_error() -> None:
    async def scenario() -> list[dict]:
        stream = EventQueue()
        events = RequestEvents([stream], "c")
        work = generate(FakeEngine(fail_with=PipelineError("boom")), Generation(GenerateRequest(prompt="p"), events))
        return [json.loads(line) async for line in ndjson_stream(work, stream, lambda e: {"$error": e.to_wire()})]

    lines = asyncio.run(scenario())
    assert lines[-1] == {"$error": {"code": "PIPELINE_ERROR", "name": "PipelineError", "message": "boom"}}
    assert lines[-2]["status"] == "error"
