"""GET /metrics over the app with the real batching engine and the tiny model: one request, then a scrape."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from diffusers_api.config import Settings
from diffusers_api.http.app import create_app

AUTH = {"authorization": "Bearer metrics-secret"}
STEPS = 3


def test_a_real_request_shows_in_the_metrics(models_dir: Path) -> None:
    settings = Settings(model_id="builtin/tiny-sd", models_dir=models_dir, api_key="metrics-secret")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").json()["status"] != "READY":
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)
        request = {"prompt": "a red barn", "num_inference_steps": STEPS, "width": 64, "height": 64, "seed": 1}
        assert client.post("/v1/generate", json=request, headers=AUTH).status_code == 200

        assert client.get("/metrics").status_code == 401
        scraped = client.get("/metrics", headers=AUTH)
        batching = client.get("/health").json()["batching"]

    assert scraped.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(scraped.text)}
    values = {sample.name: sample for family in families.values() for sample in family.samples if not sample.labels}

    requests = {(s.labels["status"], s.labels["code"]): s.value for s in families["diffusers_api_requests"].samples}
    assert requests == {("done", ""): 1.0}
    stage_counts = {
        s.labels["stage"]: s.value
        for s in families["diffusers_api_stage_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert stage_counts["inference"] == 1.0
    assert {"loadModel", "encode"} <= set(stage_counts)
    assert values["diffusers_api_request_duration_seconds_count"].value == 1.0
    assert values["diffusers_api_queue_depth"].value == 0.0

    # batch sizes: one histogram observation per UNet forward, as the batcher counted them for /health
    forwards = values["diffusers_api_unet_forward_rows_count"].value
    assert forwards == batching["forwards"] > 0
    assert values["diffusers_api_unet_forward_rows_sum"].value == batching["rows_total"]
    assert values["diffusers_api_loop_jobs_total"].value == 1.0
    assert values["diffusers_api_loop_job_steps_total"].value == STEPS
    # one request: it encoded and decoded alone
    assert batching["encode"] == {"batches": 0, "prompts": 0, "mean_prompts": 0.0, "fallbacks": 0}
    assert values["diffusers_api_encode_batches_total"].value == 0.0
    assert "diffusers_api_gpu_memory_bytes" not in families  # CPU
