"""Every input answered in the error format, on the tiny models: what a request may ask for is checked against
the model before anything runs, and before anything is downloaded for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_api.config import Settings
from diffusers_api.errors import InvalidInputs, InvalidScheduler, NoSuchPipeline
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest
from support.servers import file_server

STEPS = 2


@pytest.fixture(scope="module")
def runner(models_dir: Path) -> Runner:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, allow_private_urls=True))
    runner.start()
    return runner


def ask(**fields: object) -> GenerateRequest:
    return GenerateRequest(**({"prompt": "a lighthouse", "num_inference_steps": STEPS, "seed": 1} | fields))


# --- the pipeline's own arguments ------------------------------------------------------------------------------


def test_the_pipelines_catch_all_kwargs_is_not_an_input(runner: Runner) -> None:
    """StableDiffusionPipeline.__call__ ends in **kwargs (deprecated callbacks): a request must not reach it."""
    with pytest.raises(InvalidInputs, match="not inputs of StableDiffusionPipeline: kwargs") as caught:
        runner.run(ask(extra={"kwargs": {"callback": 1}}))
    assert "kwargs" not in caught.value.extra["accepted"]
    assert "guidance_rescale" in caught.value.extra["accepted"]


def test_no_such_pipeline_lists_every_pipeline_the_server_accepts(runner: Runner) -> None:
    with pytest.raises(NoSuchPipeline) as caught:
        runner.run(ask(pipeline="NotAPipeline"))
    available = caught.value.extra["available"]
    assert {"txt2img", "StableDiffusionInpaintPipelineLegacy", "StableDiffusionSAGPipeline"} <= set(available)
    model = runner.store.get(ask())
    for name in available:  # each one it lists, it takes
        model.pipelines.resolve(name)


def test_a_pipeline_for_another_kind_of_unet_is_refused(runner: Runner) -> None:
    """DDIMPipeline takes the components this model has (a unet, a scheduler), but an unconditional UNet2DModel."""
    with pytest.raises(NoSuchPipeline, match="DDIMPipeline takes a UNet2DModel as its unet") as caught:
        runner.run(ask(pipeline="DDIMPipeline"))
    assert "DDIMPipeline" not in caught.value.extra["available"]


# --- nothing is fetched for a request that cannot run -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"pipeline": "NotAPipeline"}, NoSuchPipeline),
        ({"scheduler": "NotAScheduler"}, InvalidScheduler),
        ({"extra": {"bogus": 1}}, InvalidInputs),
        ({"pipeline": "inpaint"}, InvalidInputs),  # no mask_image
    ],
    ids=["pipeline", "scheduler", "input", "missing-mask"],
)
def test_a_request_that_cannot_run_downloads_nothing(runner: Runner, fields: dict, error: type[Exception]) -> None:
    with file_server() as files:
        files.files["/style.safetensors"] = b"never fetched"
        files.files["/image.png"] = b"never fetched"
        urls = {"lora_weights": f"{files.url}/style.safetensors", "image": f"{files.url}/image.png"}
        with pytest.raises(error):
            runner.run(ask(**(urls | fields)))
        assert files.requests == []


# --- which model and precision a request gets -------------------------------------------------------------------


def test_a_request_without_a_model_gets_the_configured_one_not_the_last_used(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, runtime_downloads=True))
    runner.start()
    assert runner.run(ask(model="builtin/tiny-sdxl")).meta["MODEL_ID"] == "builtin/tiny-sdxl"
    assert runner.run(ask()).meta["MODEL_ID"] == "builtin/tiny-sd"


def test_a_request_without_a_precision_gets_the_configured_one(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, runtime_downloads=True))
    runner.start()
    assert runner.run(ask(precision="bf16")).meta["PRECISION"] == "bf16"
    assert runner.run(ask()).meta["PRECISION"] == "fp32"  # the model's own float32, spelled as the setting is
    assert runner.run(ask(model="builtin/tiny-sdxl")).meta["PRECISION"] == "fp32"


def test_another_model_is_loaded_in_the_configured_precision(models_dir: Path) -> None:
    settings = Settings(model_id="builtin/tiny-sd", model_precision="bf16", models_dir=models_dir, runtime_downloads=True)
    runner = Runner(settings)
    runner.start()
    assert runner.run(ask(model="builtin/tiny-sdxl")).meta["PRECISION"] == "bf16"
    assert runner.run(ask(model="builtin/tiny-sdxl", precision="fp32")).meta["PRECISION"] == "fp32"
    assert runner.run(ask()).meta["PRECISION"] == "bf16"
