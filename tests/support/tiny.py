"""The tiny built-in models as the batched-call tests use them (test_batched_decode, test_batched_encode): each
loaded once, a request's own pipeline over the model's shared components, small two-step calls, and the bound a
batched image is held to.

Batched calls are not bit-identical to one call per request on a CPU (batched kernels round differently in the
last float bits), so their images are held to the bound the batched UNet steps are held to in test_batching.py:
at most one 8-bit level apart, on at most 1% of the pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import Rendezvous, SharedSteps
from diffusers_api.models.store import LoadedModel, ModelStore
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, GenerateResult

MAX_LEVEL_DIFFERENCE = 1  # as tests/integration/test_batching.py
MAX_DIFFERING_SHARE = 0.01

# model -> the arguments of its requests: small images, two steps
MODELS = {
    "builtin/tiny-sd": {},
    "builtin/tiny-sdxl": {},
    "builtin/tiny-sd3": {"height": 32, "width": 32},
    "builtin/tiny-flux": {"height": 32, "width": 32},
    "builtin/tiny-pixart": {"height": 32, "width": 32, "use_resolution_binning": False, "clean_caption": False},
}
_LOADED: dict[tuple[Path, str], LoadedModel] = {}


def model(models_dir: Path, model_id: str) -> LoadedModel:
    """Each tiny model loaded once per session."""
    if (models_dir, model_id) not in _LOADED:
        store = ModelStore(Settings(model_id=model_id, models_dir=models_dir))
        store.load_default()
        _LOADED[models_dir, model_id] = store.get(GenerateRequest(prompt="x"))
    return _LOADED[models_dir, model_id]


def new_pipe(loaded: LoadedModel) -> Any:
    """A request's own pipeline over the model's shared components (VAE and text encoders among them)."""
    pipelines = loaded.pipelines
    scheduler = pipelines.scheduler(type(pipelines.base.scheduler).__name__)
    return pipelines.build(pipelines.resolve("txt2img"), scheduler, safety_checker=False)


def call(seed: int, images: int = 1, **kwargs: Any) -> dict[str, Any]:
    """A request's arguments: its own prompt and seeds, two steps."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(images)]
    defaults = {"prompt": f"a red barn {seed}", "num_inference_steps": 2}
    return defaults | {"num_images_per_prompt": images, "generator": generators} | kwargs


def assert_close(batched: np.ndarray, alone: np.ndarray) -> None:
    difference = np.abs(batched - alone)
    assert difference.max() <= MAX_LEVEL_DIFFERENCE
    assert (difference > 0).mean() <= MAX_DIFFERING_SHARE


def shared_runner(
    models_dir: Path, requests: list[GenerateRequest]
) -> tuple[Runner, SharedSteps, list[GenerateResult]]:
    """A runner over tiny-sd whose requests share steps (as the engine serves them), its `SharedSteps`, and the
    `requests`' results run alone (diffusers' own call) on the same store, the reference."""
    settings = Settings(model_id="builtin/tiny-sd", models_dir=models_dir)
    alone = Runner(settings)
    alone.start()
    expected = [alone.run(request) for request in requests]
    steps = SharedSteps(Rendezvous(max_wait_s=5.0))
    return Runner(settings, store=alone.store, steps=steps), steps, expected


def assert_as_alone(results: list[GenerateResult], expected: list[GenerateResult]) -> None:
    """Results of our loop, each within the bound of its request's result alone."""
    for result, solo in zip(results, expected, strict=True):
        assert result.meta["LOOP"] == "batched"
        assert_close(pixels(result), pixels(solo))


def pixels(result: GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)
