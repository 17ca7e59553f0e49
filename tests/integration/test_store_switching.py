"""Runtime switching: resident models in an LRU under MODEL_MEMORY_BUDGET; evicted models free their memory."""

from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from diffusers_api.config import Settings
from diffusers_api.engine import SerialEngine
from diffusers_api.errors import ModelMismatch
from diffusers_api.http.app import create_app
from diffusers_api.imaging import to_base64
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest
from support.fakes import png_bytes

SD, INPAINT, SDXL = "builtin/tiny-sd", "builtin/tiny-sd-inpaint", "builtin/tiny-sdxl"


def ask(model: str) -> GenerateRequest:
    request: dict[str, Any] = {"model": model, "prompt": "a cat", "num_inference_steps": 2, "seed": 1}
    if model == INPAINT:
        request |= {"image": to_base64(png_bytes(size=64)), "mask_image": to_base64(png_bytes((255,) * 3, 64))}
    return GenerateRequest(**request)


@pytest.fixture(scope="module")
def sizes(models_dir: Path) -> dict[str, int]:
    """Weight bytes of each tiny model, measured by loading them under a budget that holds all three."""
    runner = Runner(Settings(models_dir=models_dir, runtime_downloads=True, model_memory_budget="1GB"))
    for model in (SD, INPAINT, SDXL):
        runner.run(ask(model))
    return {model.spec.model_id: model.bytes for model in runner.store.resident}


def test_a_budget_for_two_evicts_the_least_recently_used_and_frees_it(models_dir: Path, sizes: dict[str, int]) -> None:
    # Any two fit (with 1% to spare for the estimate made before loading), never all three.
    budget = sum(sizes.values()) - min(sizes.values()) + min(sizes.values()) // 100
    runner = Runner(Settings(models_dir=models_dir, runtime_downloads=True, model_memory_budget=budget))
    runner.run(ask(SD))
    runner.run(ask(SDXL))
    unet = weakref.ref(runner.store.resident[0].pipelines.base.unet)  # SD's, the least recently used
    runner.run(ask(INPAINT))  # needs room: SD goes
    assert [model.spec.model_id for model in runner.store.resident] == [SDXL, INPAINT]
    gc.collect()
    assert unet() is None, "the evicted model's weights are still referenced"
    assert runner.store.resident_bytes() == sizes[SDXL] + sizes[INPAINT]
    runner.run(ask(SDXL))  # SDXL is now the most recently used ...
    runner.run(ask(SD))  # ... so the inpainting model goes
    assert [model.spec.model_id for model in runner.store.resident] == [SDXL, SD]


def test_without_a_budget_one_model_is_resident(models_dir: Path) -> None:
    runner = Runner(Settings(models_dir=models_dir, runtime_downloads=True))
    for model in (SD, SDXL, SD):
        assert runner.run(ask(model)).meta["MODEL_ID"] == model
        assert [loaded.spec.model_id for loaded in runner.store.resident] == [model]


def test_runtime_downloads_off_is_a_mismatch_naming_what_is_available(models_dir: Path) -> None:
    runner = Runner(Settings(models_dir=models_dir, model_id=SD))
    runner.start()
    with pytest.raises(ModelMismatch) as caught:
        runner.run(ask(SDXL))
    assert caught.value.extra == {"requested": SDXL, "available": [SD]}


def test_models_endpoint_lists_loaded_and_cached_models(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, model_id=SD, api_key="k", runtime_downloads=True)
    with TestClient(create_app(settings, SerialEngine(Runner(settings), max_queue=4))) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").json()["status"] != "READY":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/v1/models").status_code == 401
        body = client.get("/v1/models", headers={"authorization": "Bearer k"}).json()
    assert [model["model_id"] for model in body["loaded"]] == [SD]
    assert body["loaded"][0]["bytes"] > 0
    assert "models--builtin--tiny-sd" in {model["id"] for model in body["cached"]}
