"""What `GET /metrics` reports, in the Prometheus text format.

Two sources, both read without a background thread:

- **Requests**, from their events (events.py): each request's emitter gets a sink made by `request_sink`, which
  counts the request's start and outcome (`done`, or `error` with its code) and observes the request's
  duration and the milliseconds per stage that `done` carries in `timings`. These are plain counters kept
  here under a lock: a sink must return at once, and may be called from any thread.
- **The engine, at scrape time**: queue depth, lifecycle state, the batcher's and the denoising loop's counters,
  the rows of each UNet forward (batch sizes), and GPU memory.

prometheus_client is imported at the first scrape only, so that building the app (and so the server's start)
costs nothing more; the engine never imports it. Each `Metrics` has its own registry, never the global one.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .engine.base import Health, probe_device_memory

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import HistogramMetricFamily, Metric

    from .denoising.groups import GroupStats
    from .denoising.loop import LoopStats
    from .denoising.rendezvous import BatchStats
    from .engine import Engine
    from .events import Event, Sink

# seconds: from 10 ms (encoding a small image) to 5 minutes (a large model's first download)
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
# rows per UNet forward: powers of two up to the largest CUDA graph bucket (128 rows), and one above
ROWS_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class Histogram:
    """A histogram's state without prometheus_client: counts per bucket (the last one is +Inf) and the sum."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times  # buckets hold values <= their bound
        self.sum += value * times

    def copy(self) -> Histogram:
        copied = Histogram(self.bounds)
        copied.counts, copied.sum = list(self.counts), self.sum
        return copied

    @classmethod
    def of(cls, bounds: Sequence[float], counts: Mapping[int, int]) -> Histogram:
        """The histogram of values counted in a mapping (value -> how many times it was seen)."""
        histogram = cls(bounds)
        for value, times in counts.items():
            histogram.observe(value, times)
        return histogram


class Metrics:
    """The metrics of one app: request counters fed by per-request sinks, and the engine read at scrape time."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.perf_counter) -> None:
        self.engine = engine
        self.clock = clock
        self._lock = threading.Lock()
        self._started = 0
        self._finished: collections.Counter[tuple[str, str]] = collections.Counter()  # (status, code) -> count
        self._durations = Histogram(SECONDS_BUCKETS)
        self._stages: dict[str, Histogram] = {}
        self._registry: CollectorRegistry | None = None

    # --- requests, from their events ---------------------------------------------------------------------------

    def request_sink(self) -> Sink:
        """A sink for the events of one request (EventHub.request_sinks calls this once per request)."""
        started: list[float] = []

        def sink(event: Event) -> None:
            status = event["status"]
            if status == "progress" or event["type"] != "inference":
                return
            if status == "start":
                started.append(self.clock())
                self._start()
            elif status == "done":
                elapsed = self.clock() - started[0] if started else None
                self._done(elapsed, event["payload"].get("timings") or {})
            elif status == "error":
                self._error(str(event["payload"].get("error", {}).get("code", "UNKNOWN")))

        return sink

    def _start(self) -> None:
        with self._lock:
            self._started += 1

    def _done(self, elapsed_s: float | None, timings: Mapping[str, Any]) -> None:
        with self._lock:
            self._finished["done", ""] += 1
            if elapsed_s is not None:
                self._durations.observe(elapsed_s)
            for stage, ms in timings.items():
                if isinstance(ms, int | float):
                    self._stages.setdefault(stage, Histogram(SECONDS_BUCKETS)).observe(ms / 1000)

    def _error(self, code: str) -> None:
        with self._lock:
            self._finished["error", code] += 1

    # --- exposition --------------------------------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry()), CONTENT_TYPE_LATEST

    def registry(self) -> CollectorRegistry:
        """This app's registry: these metrics and the process's (CPU, memory, open files)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            registry = CollectorRegistry()
            registry.register(self)
            ProcessCollector(registry=registry)
            self._registry = registry
        return self._registry

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: every family, read now."""
        yield from self._request_families()
        yield from _engine_families(self.engine)

    def _request_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        with self._lock:
            started, finished = self._started, dict(self._finished)
            durations = self._durations.copy()
            stages = {stage: histogram.copy() for stage, histogram in self._stages.items()}
        yield CounterMetricFamily(
            "diffusers_api_requests_started", "Requests handed to the engine (cancelled ones included).", started
        )
        requests = CounterMetricFamily(
            "diffusers_api_requests",
            "Requests that ended, by status (done, error) and error code (CANCELLED for cancelled ones).",
            labels=["status", "code"],
        )
        for (status, code), count in sorted(finished.items()):
            requests.add_metric([status, code], count)
        yield requests
        duration = HistogramMetricFamily(
            "diffusers_api_request_duration_seconds",
            "Seconds from handing a request to the engine (queueing included) to its result, for requests done.",
        )
        _add_histogram(duration, [], durations)
        yield duration
        per_stage = HistogramMetricFamily(
            "diffusers_api_stage_duration_seconds",
            "Seconds per stage of requests done, as in their timings (init, loadModel, download, inference, ...).",
            labels=["stage"],
        )
        for stage, histogram in sorted(stages.items()):
            _add_histogram(per_stage, [stage], histogram)
        yield per_stage


def _engine_families(engine: Engine) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    state = engine.health
    depth = engine.queue_depth
    yield GaugeMetricFamily("diffusers_api_queue_depth", "Requests in the engine, waiting or running.", depth)
    states = GaugeMetricFamily("diffusers_api_engine_state", "1 for the engine's lifecycle state.", labels=["state"])
    for health in Health:
        states.add_metric([health.value], 1 if health is state else 0)
    yield states
    stats = engine.stats()  # the batching engine's; the serial engine has none
    if stats is not None:
        yield from _batcher_families(stats.batch)
        yield from _loop_families(stats.loop)
        yield from _group_families(stats.decode, "decode", "VAE calls that decoded requests finishing together")
        yield from _group_families(stats.encode, "encode", "Text-encoder calls that encoded requests arriving together")
    memory = probe_device_memory(state)
    if memory is not None:
        yield _gpu_memory_family(memory)


def _batcher_families(stats: BatchStats) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    yield CounterMetricFamily("diffusers_api_batch_rounds", "Rounds of the UNet rendezvous.", stats.rounds)
    yield CounterMetricFamily(
        "diffusers_api_batch_timeouts",
        "Rounds fired by BATCH_WAIT_MS rather than by every participant arriving.",
        stats.timeouts,
    )
    rows = HistogramMetricFamily(
        "diffusers_api_unet_forward_rows",
        "Rows (latents; twice the images with guidance) per UNet forward: the batch sizes. "
        "_count is the number of forwards, _sum the rows.",
    )
    # dict() copies the Counter in one step (the device thread may add a key meanwhile); iterating it would not
    _add_histogram(rows, [], Histogram.of(ROWS_BUCKETS, dict(stats.row_counts)))
    yield rows


def _loop_families(stats: LoopStats) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield CounterMetricFamily("diffusers_api_loop_rounds", "Rounds of the batched denoising loop.", stats.rounds)
    yield CounterMetricFamily("diffusers_api_loop_jobs", "Requests that entered the denoising loop.", stats.jobs)
    yield CounterMetricFamily(
        "diffusers_api_loop_job_steps", "Denoising steps taken, summed over requests.", stats.job_steps
    )
    yield GaugeMetricFamily("diffusers_api_loop_max_jobs", "Most requests stepped in one round.", stats.max_jobs)
    yield CounterMetricFamily(
        "diffusers_api_loop_out_of_memory", "Steps that ran out of memory and were split.", stats.out_of_memory
    )


def _group_families(stats: GroupStats, kind: str, calls: str) -> Iterator[Metric]:
    """The counters of one kind of batched call (`kind`: decode, encode), `diffusers_api_{kind}_*`."""
    from prometheus_client.core import CounterMetricFamily

    yield CounterMetricFamily(f"diffusers_api_{kind}_batches", f"{calls}.", stats.batches)
    yield CounterMetricFamily(
        f"diffusers_api_{kind}_batched_{stats.unit}", f"The {stats.unit} those calls {kind}d.", stats.items
    )
    yield CounterMetricFamily(
        f"diffusers_api_{kind}_fallbacks",
        f"Batched calls that failed (out of memory, ...), after which each request {kind}d alone.",
        stats.fallbacks,
    )


def _gpu_memory_family(memory: Mapping[str, float]) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(
        "diffusers_api_gpu_memory_bytes",
        "GPU memory of this process's tensors: allocated now, its peak, and reserved by the allocator.",
        labels=["kind"],
    )
    for key, gb in memory.items():
        family.add_metric([key.removesuffix("_gb")], round(gb * 1e9))  # device_memory rounds to MB
    return family


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    from prometheus_client.utils import floatToGoString

    bounds: Iterable[str] = [*map(floatToGoString, histogram.bounds), "+Inf"]
    cumulative = 0
    buckets = []
    for bound, count in zip(bounds, histogram.counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    family.add_metric(labels, buckets, histogram.sum)
