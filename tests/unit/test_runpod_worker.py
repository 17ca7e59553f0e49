"""The RunPod handler over a fake engine: job inputs, outputs, errors as strings, refresh_worker, progress."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from diffusers_api.config import Settings
from diffusers_api.devices import is_fatal_device_error
from diffusers_api.engine import Health
from diffusers_api.errors import InvalidInputs, NotReady, PipelineError
from diffusers_api.events import EventHub
from diffusers_api.runpod_worker import concurrency, make_handler, runpod_error
from support.fakes import FakeEngine

LEGACY = {"modelInputs": {"prompt": "grass", "seed": 5}, "callInputs": {}}


class ProgressLog:
    """Stands in for runpod.serverless.progress_update."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, Any]] = []

    def __call__(self, job: dict[str, Any], progress: Any) -> None:
        self.updates.append((job["id"], progress))


def run_job(engine: FakeEngine, job_input: Any, progress: ProgressLog | None = None) -> dict[str, Any]:
    handler = make_handler(engine, EventHub(Settings()), progress or ProgressLog())
    return asyncio.run(handler({"id": "job-1", "input": job_input}))


def test_a_legacy_job_answers_like_post_root() -> None:
    output = run_job(FakeEngine(), LEGACY)
    assert base64.b64decode(output["image_base64"]).startswith(b"\x89PNG")
    assert output["$meta"]["seed"] == 5
    assert "error" not in output


def test_a_double_encoded_legacy_job_is_accepted() -> None:
    import json

    assert "image_base64" in run_job(FakeEngine(), json.dumps(LEGACY))


def test_a_native_job_answers_like_v1_generate() -> None:
    output = run_job(FakeEngine(), {"prompt": "grass", "seed": 9, "num_images_per_prompt": 2})
    assert [image["seed"] for image in output["images"]] == [9, 10]


@pytest.mark.parametrize(
    ("job_input", "fragment"),
    [
        (None, "INVALID_INPUTS: the job has no 'input'"),
        ([1, 2], "INVALID_INPUTS: job input must be a JSON object"),
        ({"modelInputs": {"width": 65}, "callInputs": {}}, "INVALID_INPUTS: width: Input should be a multiple of 8"),
        ({"prompt": "x", "bogus": 1}, "INVALID_INPUTS: bogus: Extra inputs are not permitted"),
    ],
    ids=["no-input", "list", "bad-width", "unknown-native-field"],
)
def test_a_bad_job_fails_with_a_string_error_and_its_code(job_input: Any, fragment: str) -> None:
    output = run_job(FakeEngine(), job_input)
    assert isinstance(output["error"], str)
    assert output["error"].startswith(fragment)
    assert output["$error"]["code"] == "INVALID_INPUTS"
    assert "refresh_worker" not in output


def test_an_engine_error_is_a_failed_job_without_refresh() -> None:
    output = run_job(FakeEngine(fail_with=PipelineError("out of GPU memory: try fewer images")), LEGACY)
    assert output["error"] == "PIPELINE_ERROR: out of GPU memory: try fewer images"
    assert "refresh_worker" not in output


def test_a_fatal_device_error_asks_runpod_to_refresh_the_worker() -> None:
    cause = RuntimeError("CUDA error: an illegal memory access was encountered")
    error = PipelineError(f"RuntimeError: {cause}")
    error.__cause__ = cause
    output = run_job(FakeEngine(fail_with=error), LEGACY)
    assert output["refresh_worker"] is True
    assert output["error"].startswith("PIPELINE_ERROR: RuntimeError: CUDA error")


def test_a_defunct_engine_asks_runpod_to_refresh_the_worker() -> None:
    """After a fatal device error the engine refuses every job: each asks RunPod for a new worker."""
    engine = FakeEngine(health=Health.DEFUNCT, fail_with=NotReady("the server is defunct", state="DEFUNCT"))
    output = run_job(engine, LEGACY)
    assert output["refresh_worker"] is True
    assert output["$error"]["code"] == "NOT_READY"


def test_fatal_errors_are_found_in_the_cause_chain() -> None:
    with pytest.raises(PipelineError) as caught:
        _fail_inside_cublas()
    assert is_fatal_device_error(caught.value)
    assert not is_fatal_device_error(InvalidInputs("width: bad"))


def test_an_unexpected_exception_becomes_app_inference_error() -> None:
    body = runpod_error(KeyError("x"))
    assert body["error"] == "APP_INFERENCE_ERROR: KeyError: 'x'"
    assert body["$error"]["name"] == "KeyError"
    assert "stack" not in body["$error"]


def test_with_debug_a_failed_job_carries_the_stack() -> None:
    try:
        raise PipelineError("boom")
    except PipelineError as error:
        failing = FakeEngine(fail_with=error)
    handler = make_handler(failing, EventHub(Settings(debug=True)), ProgressLog())
    output = asyncio.run(handler({"id": "job-1", "input": LEGACY}))
    assert output["$error"]["name"] == "PipelineError"
    assert "PipelineError: boom" in output["$error"]["stack"]


def test_jobs_fail_clearly_when_the_model_did_not_load() -> None:
    output = run_job(FakeEngine(setup_error="MODEL_NOT_FOUND: no such model"), LEGACY)
    assert output["error"].startswith("NOT_READY: the model failed to load: MODEL_NOT_FOUND")


def test_progress_goes_to_runpod_throttled_by_callback_steps() -> None:
    progress = ProgressLog()
    job = {"modelInputs": {"prompt": "grass", "callback_steps": 2}, "callInputs": {}}
    run_job(FakeEngine(steps=6), job, progress)
    assert [job_id for job_id, _ in progress.updates] == ["job-1"] * 3
    updates = [update for _, update in progress.updates]
    assert [(u["stage"], u["step"], u["steps"]) for u in updates] == [("inference", step, 6) for step in (2, 4, 6)]
    assert all(u["eta_s"] >= 0 for u in updates)  # the seconds left, at the pace so far


def test_concurrent_jobs_all_complete() -> None:
    handler = make_handler(FakeEngine(delay_s=0.05), EventHub(Settings()), ProgressLog())

    async def many() -> list[dict[str, Any]]:
        jobs = [{"id": f"job-{i}", "input": {"prompt": "p", "seed": i}} for i in range(4)]
        return await asyncio.gather(*(handler(job) for job in jobs))

    outputs = asyncio.run(many())
    assert [output["images"][0]["seed"] for output in outputs] == [0, 1, 2, 3]


def test_concurrency_comes_from_the_settings() -> None:
    assert concurrency(Settings(runpod_concurrency=6))(1) == 6


def _fail_inside_cublas() -> None:
    try:
        raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm")
    except RuntimeError as inner:
        raise PipelineError("the pipeline failed") from inner
