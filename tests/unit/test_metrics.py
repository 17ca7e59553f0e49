"""GET /metrics: request counters fed by events, the engine read at scrape time, the route and its auth."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from diffusers_api.config import Settings
from diffusers_api.denoising import SharedSteps
from diffusers_api.engine import Health
from diffusers_api.engine import base as engine_base
from diffusers_api.errors import Busy, PipelineError
from diffusers_api.events import EventHub
from diffusers_api.generation import Generation, generate
from diffusers_api.metrics import Metrics
from diffusers_api.schema import GenerateRequest, GenerateResult
from support.apps import make_client
from support.envelopes import GRASS
from support.fakes import FakeEngine

Labels = tuple[tuple[str, str], ...]


def samples(text: str) -> dict[str, dict[Labels, float]]:
    """Sample name -> {sorted label pairs: value}, parsed from the exposition text."""
    parsed: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return parsed


def scrape(metrics: Metrics) -> dict[str, dict[Labels, float]]:
    body, _ = metrics.exposition()
    return samples(body.decode())


def buckets(parsed: dict[str, dict[Labels, float]], name: str, **labels: str) -> dict[str, float]:
    """le -> cumulative count of one histogram series."""
    found = {}
    for pairs, value in parsed[f"{name}_bucket"].items():
        as_dict = dict(pairs)
        le = as_dict.pop("le")
        if as_dict == labels:
            found[le] = value
    return found


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SlowEngine(FakeEngine):
    """A FakeEngine whose requests take `seconds` on the test's clock, with `timings` in their result."""

    clock: Clock = field(default_factory=Clock)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    async def submit(self, generation: Generation) -> GenerateResult:
        result = await super().submit(generation)
        self.clock.now += self.seconds
        result.timings = dict(self.timings)
        return result


def run_requests(engine: FakeEngine, metrics: Metrics, count: int = 1) -> list[object]:
    """`count` requests through generation.generate, with the metrics' sink on each, as every transport does."""
    hub = EventHub(Settings())
    hub.request_sinks.append(metrics.request_sink)

    async def one() -> object:
        request = GenerateRequest(prompt="x")
        try:
            return await generate(engine, Generation(request, await hub.for_request(request)))
        except Exception as exc:  # the caller checks what was counted, not what was raised
            return exc

    async def all_of_them() -> list[object]:
        return [await one() for _ in range(count)]

    return asyncio.run(all_of_them())


# --- requests, from their events -------------------------------------------------------------------------------


def test_a_done_request_is_counted_and_timed_per_stage() -> None:
    clock = Clock()
    engine = SlowEngine(
        clock=clock, seconds=2.0, steps=5, timings={"loadModel": 20.0, "inference": 1500.0, "encode": 3.0}
    )
    metrics = Metrics(engine, clock=clock)
    run_requests(engine, metrics)
    parsed = scrape(metrics)
    assert parsed["diffusers_api_requests_started_total"] == {(): 1.0}
    assert parsed["diffusers_api_requests_total"] == {(("code", ""), ("status", "done")): 1.0}
    inference = buckets(parsed, "diffusers_api_stage_duration_seconds", stage="inference")
    assert (inference["1.0"], inference["2.5"], inference["+Inf"]) == (0, 1, 1)
    load = buckets(parsed, "diffusers_api_stage_duration_seconds", stage="loadModel")
    assert (load["0.01"], load["0.025"]) == (0, 1)
    stage_sums = parsed["diffusers_api_stage_duration_seconds_sum"]
    assert stage_sums[(("stage", "inference"),)] == pytest.approx(1.5)
    assert stage_sums[(("stage", "encode"),)] == pytest.approx(0.003)
    assert set(parsed["diffusers_api_stage_duration_seconds_count"].values()) == {1.0}
    duration = buckets(parsed, "diffusers_api_request_duration_seconds")
    assert (duration["1.0"], duration["2.5"]) == (0, 1)
    assert parsed["diffusers_api_request_duration_seconds_sum"] == {(): pytest.approx(2.0)}


def test_histograms_accumulate_over_requests() -> None:
    clock = Clock()
    engine = SlowEngine(clock=clock, seconds=0.3, timings={"inference": 250.0})
    metrics = Metrics(engine, clock=clock)
    run_requests(engine, metrics, count=3)
    parsed = scrape(metrics)
    inference = buckets(parsed, "diffusers_api_stage_duration_seconds", stage="inference")
    assert (inference["0.1"], inference["0.25"], inference["+Inf"]) == (0, 3, 3)  # 0.25 s is in le=0.25
    assert parsed["diffusers_api_request_duration_seconds_count"] == {(): 3.0}
    assert parsed["diffusers_api_requests_total"] == {(("code", ""), ("status", "done")): 3.0}


@pytest.mark.parametrize(
    ("error", "code"),
    [(PipelineError("boom"), "PIPELINE_ERROR"), (Busy("full"), "BUSY"), (RuntimeError("bug"), "APP_INFERENCE_ERROR")],
    ids=["pipeline-error", "busy", "unexpected"],
)
def test_errors_are_counted_by_code_and_not_timed(error: Exception, code: str) -> None:
    engine = FakeEngine(fail_with=error)  # type: ignore[arg-type]
    metrics = Metrics(engine)
    run_requests(engine, metrics, count=2)
    parsed = scrape(metrics)
    assert parsed["diffusers_api_requests_total"] == {(("code", code), ("status", "error")): 2.0}
    assert parsed["diffusers_api_request_duration_seconds_count"] == {(): 0.0}
    assert "diffusers_api_stage_duration_seconds_count" not in parsed  # no stage seen yet: no series


def test_a_cancelled_request_is_counted_as_cancelled() -> None:
    engine = FakeEngine(delay_s=30)
    metrics = Metrics(engine)
    hub = EventHub(Settings())
    hub.request_sinks.append(metrics.request_sink)

    async def cancel_one() -> None:
        events = await hub.for_request(GenerateRequest())
        task = asyncio.ensure_future(generate(engine, Generation(GenerateRequest(), events)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_one())
    parsed = scrape(metrics)
    assert parsed["diffusers_api_requests_started_total"] == {(): 1.0}
    assert parsed["diffusers_api_requests_total"] == {(("code", "CANCELLED"), ("status", "error")): 1.0}


def test_progress_and_other_events_are_ignored() -> None:
    metrics = Metrics(FakeEngine())
    sink = metrics.request_sink()
    for step in range(1, 100):
        sink({"type": "inference", "status": "progress", "payload": {"step": step, "steps": 100}})
    sink({"type": "init", "status": "done", "payload": {"timings": {"init": 5.0}}})
    parsed = scrape(metrics)
    assert parsed["diffusers_api_requests_started_total"] == {(): 0.0}
    assert "diffusers_api_stage_duration_seconds_count" not in parsed


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(FakeEngine()), Metrics(FakeEngine())
    run_requests(first.engine, first)  # type: ignore[arg-type]
    assert scrape(first)["diffusers_api_requests_started_total"] == {(): 1.0}
    assert scrape(second)["diffusers_api_requests_started_total"] == {(): 0.0}


# --- the engine, at scrape time --------------------------------------------------------------------------------


def batching_fake() -> FakeEngine:
    """A FakeEngine with the batching engine's real (idle) rendezvous and denoising loop, for their counters."""
    return FakeEngine(shared=SharedSteps())


def test_batch_sizes_are_a_histogram_of_rows_per_forward() -> None:
    engine = batching_fake()
    stats = engine.shared.rendezvous.stats  # type: ignore[union-attr]
    for rows in (2, 2, 16):
        stats.record(rows)
    stats.rounds, stats.timeouts = 3, 1
    parsed = scrape(Metrics(engine))
    rows = buckets(parsed, "diffusers_api_unet_forward_rows")
    assert rows == {
        "1.0": 0,
        "2.0": 2,
        "4.0": 2,
        "8.0": 2,
        "16.0": 3,
        "32.0": 3,
        "64.0": 3,
        "128.0": 3,
        "256.0": 3,
        "+Inf": 3,
    }
    assert parsed["diffusers_api_unet_forward_rows_count"] == {(): stats.forwards}
    assert parsed["diffusers_api_unet_forward_rows_sum"] == {(): stats.rows_total}
    assert parsed["diffusers_api_batch_rounds_total"] == {(): 3.0}
    assert parsed["diffusers_api_batch_timeouts_total"] == {(): 1.0}


def test_batch_rows_histogram_counts_since_the_start_not_the_recent_window() -> None:
    engine = batching_fake()
    for _ in range(1500):  # BatchStats.rows keeps the last 1000 only
        engine.shared.rendezvous.stats.record(4)  # type: ignore[union-attr]
    parsed = scrape(Metrics(engine))
    assert parsed["diffusers_api_unet_forward_rows_count"] == {(): 1500.0}
    assert buckets(parsed, "diffusers_api_unet_forward_rows")["4.0"] == 1500


def test_denoising_loop_counters() -> None:
    engine = batching_fake()
    loop = engine.shared.denoiser.stats  # type: ignore[union-attr]
    loop.rounds, loop.jobs, loop.job_steps, loop.max_jobs, loop.out_of_memory = 20, 3, 45, 3, 1
    parsed = scrape(Metrics(engine))
    assert parsed["diffusers_api_loop_out_of_memory_total"] == {(): 1.0}
    assert parsed["diffusers_api_loop_rounds_total"] == {(): 20.0}
    assert parsed["diffusers_api_loop_jobs_total"] == {(): 3.0}
    assert parsed["diffusers_api_loop_job_steps_total"] == {(): 45.0}
    assert parsed["diffusers_api_loop_max_jobs"] == {(): 3.0}


def test_batched_decode_and_encode_counters() -> None:
    engine = batching_fake()
    decode = engine.shared.denoiser.decode_stats  # type: ignore[union-attr]
    decode.count(8)
    decode.count(3)
    decode.count_fallback()
    engine.shared.encodes.stats.count(5)  # type: ignore[union-attr]
    parsed = scrape(Metrics(engine))
    assert parsed["diffusers_api_decode_batches_total"] == {(): 2.0}
    assert parsed["diffusers_api_decode_batched_images_total"] == {(): 11.0}
    assert parsed["diffusers_api_decode_fallbacks_total"] == {(): 1.0}
    assert parsed["diffusers_api_encode_batches_total"] == {(): 1.0}
    assert parsed["diffusers_api_encode_batched_prompts_total"] == {(): 5.0}
    assert parsed["diffusers_api_encode_fallbacks_total"] == {(): 0.0}


def test_the_serial_engine_has_no_batch_metrics() -> None:
    parsed = scrape(Metrics(FakeEngine()))  # no batcher, no denoiser: as the serial engine
    prefixes = ("diffusers_api_batch", "diffusers_api_loop", "diffusers_api_decode", "diffusers_api_encode")
    assert not [name for name in parsed if name.startswith(prefixes)]
    assert "diffusers_api_unet_forward_rows_count" not in parsed


@pytest.mark.parametrize("state", list(Health), ids=str)
def test_engine_state_and_queue_depth(state: Health) -> None:
    parsed = scrape(Metrics(FakeEngine(health=state, queue_depth=3)))
    assert parsed["diffusers_api_queue_depth"] == {(): 3.0}
    assert parsed["diffusers_api_engine_state"] == {(("state", h.value),): float(h is state) for h in Health}


def test_gpu_memory_is_read_only_once_the_engine_has_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """While STARTING the engine's thread may be importing torch: the scrape must leave it alone (as /health)."""
    reads: list[int] = []

    def device_memory() -> dict[str, float]:
        reads.append(1)
        return {"allocated_gb": 1.5, "peak_allocated_gb": 2.25, "reserved_gb": 3.0}

    monkeypatch.setattr(engine_base, "device_memory", device_memory)
    engine = FakeEngine(health=Health.STARTING)
    metrics = Metrics(engine)
    assert "diffusers_api_gpu_memory_bytes" not in scrape(metrics)
    assert reads == []
    engine.health = Health.READY
    assert scrape(metrics)["diffusers_api_gpu_memory_bytes"] == {
        (("kind", "allocated"),): 1.5e9,
        (("kind", "peak_allocated"),): 2.25e9,
        (("kind", "reserved"),): 3e9,
    }


def test_no_gpu_memory_on_a_cpu() -> None:
    assert "diffusers_api_gpu_memory_bytes" not in scrape(Metrics(FakeEngine()))


# --- the route -------------------------------------------------------------------------------------------------


def test_metrics_route_answers_prometheus_text(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    parsed = samples(response.text)
    assert parsed["diffusers_api_engine_state"][(("state", "READY"),)] == 1.0
    assert "process_resident_memory_bytes" in parsed  # the process collector, in the app's own registry


def test_only_requests_that_reach_the_engine_are_counted(client: TestClient, engine: FakeEngine) -> None:
    assert client.post("/v1/generate", json={"prompt": "x"}).status_code == 200
    assert client.post("/", json=GRASS).status_code == 200
    # refused by the HTTP layer before the engine: schema validation, envelope, Accept with several images
    assert client.post("/v1/generate", json={"width": 13}).status_code == 422
    assert client.post("/", json={"modelInputs": {}}).status_code == 422
    too_many = {"prompt": "x", "num_images_per_prompt": 2}
    assert client.post("/v1/generate", json=too_many, headers={"accept": "image/png"}).status_code == 422
    engine.fail_with = Busy("full")  # refused by the engine: counted, with its code
    assert client.post("/v1/generate", json={"prompt": "x"}).status_code == 503
    parsed = samples(client.get("/metrics").text)
    assert parsed["diffusers_api_requests_started_total"] == {(): 3.0}
    assert parsed["diffusers_api_requests_total"] == {
        (("code", ""), ("status", "done")): 2.0,
        (("code", "BUSY"), ("status", "error")): 1.0,
    }
    assert parsed["diffusers_api_stage_duration_seconds_count"] == {(("stage", "inference"),): 2.0}


def test_streamed_and_image_requests_are_counted_too(client: TestClient) -> None:
    streamed = client.post("/v1/generate", json={"prompt": "x", "stream_events": True})
    assert streamed.status_code == 200
    image = client.post("/v1/generate", json={"prompt": "x"}, headers={"accept": "image/png"})
    assert image.headers["content-type"] == "image/png"
    parsed = samples(client.get("/metrics").text)
    assert parsed["diffusers_api_requests_total"] == {(("code", ""), ("status", "done")): 2.0}


def test_metrics_need_the_api_key_and_probes_do_not(engine: FakeEngine) -> None:
    with make_client(engine, api_key="s3cret") as secured:
        assert secured.get("/metrics").status_code == 401
        wrong = secured.get("/metrics", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["$error"]["code"] == "UNAUTHORIZED"
        assert secured.get("/metrics", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert secured.get("/health").status_code == 200


def test_each_app_counts_its_own_requests() -> None:
    with make_client(FakeEngine()) as busy, make_client(FakeEngine()) as idle:
        busy.post("/v1/generate", json={"prompt": "x"})
        assert samples(busy.get("/metrics").text)["diffusers_api_requests_started_total"] == {(): 1.0}
        assert samples(idle.get("/metrics").text)["diffusers_api_requests_started_total"] == {(): 0.0}


def test_building_the_app_does_not_import_prometheus_client(tmp_path: Path) -> None:
    """The server must listen within about a second (docs/performance.md, Cold start): the first scrape pays the
    import."""
    code = (
        "import sys\nfrom diffusers_api.config import Settings\nfrom diffusers_api.http.app import create_app\n"
        "create_app(Settings(model_id='builtin/tiny-sd'))\nprint('prometheus_client' in sys.modules)"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": ":".join(sys.path),
        "MODELS_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env
    )
    assert done.stdout.strip() == "False"
