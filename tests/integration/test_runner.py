"""The runner on the built-in tiny models: real pipelines, real schedulers, on the CPU."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import SharedSteps
from diffusers_api.errors import (
    Cancelled,
    InvalidImage,
    InvalidInputs,
    InvalidScheduler,
    ModelMismatch,
    ModelNotFound,
    NoModelId,
    NoSuchPipeline,
)
from diffusers_api.imaging import encode_image, to_base64
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, from_legacy
from support.servers import file_server

STEPS = 4


@pytest.fixture(scope="module")
def runner(models_dir: Path) -> Runner:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir))
    runner.start()
    return runner


def ask(**fields: object) -> GenerateRequest:
    defaults: dict[str, object] = {
        "prompt": "realistic field of grass",
        "num_inference_steps": STEPS,
        "seed": 1,
    }
    return GenerateRequest(**(defaults | fields))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def b64_image(color: tuple[int, int, int], size: int = 64) -> str:
    return to_base64(encode_image(Image.new("RGB", (size, size), color)))


def test_legacy_grass_request(runner: Runner) -> None:
    request = from_legacy(
        {
            "modelInputs": {
                "prompt": "realistic field of grass",
                "num_inference_steps": 20,
                "width": 64,
                "height": 64,
            },
            "callInputs": {"MODEL_ID": "builtin/tiny-sd"},
        }
    )
    result = runner.run(request)
    image = Image.open(io.BytesIO(result.images[0]))
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert result.timings["inference"] > 0
    assert result.meta["MODEL_ID"] == "builtin/tiny-sd"
    assert result.meta["PIPELINE"] == "StableDiffusionPipeline"
    assert result.meta["SCHEDULER"] == "DPMSolverMultistepScheduler"
    assert isinstance(result.meta["seed"], int)
    assert result.seeds == [result.meta["seed"]]
    assert result.nsfw == [False]


def test_first_request_reports_init_once(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir))
    runner.start()
    assert "init" in runner.run(ask()).timings
    assert "init" not in runner.run(ask()).timings


def test_the_first_request_waits_for_no_pipeline_imports(models_dir: Path) -> None:
    """Resolving pipeline names imports diffusers' AutoPipeline tables (1-2 s): that belongs to the model load,
    before /ping says ready, not to the first request. Checked in a fresh interpreter, which has imported none."""
    script = """
import sys
from pathlib import Path
from diffusers_api.config import Settings
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest

runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=Path(sys.argv[1])))
runner.start()
before = set(sys.modules)
for pipeline in (None, "img2img"):
    image = None if pipeline is None else sys.argv[2]
    runner.run(GenerateRequest(prompt="p", num_inference_steps=2, pipeline=pipeline, image=image))
print(sorted(name for name in set(sys.modules) - before if name.startswith("diffusers.pipelines")))
"""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(models_dir), b64_image((10, 200, 30))],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_same_seed_same_bytes_other_seed_other_image(runner: Runner) -> None:
    first, second = runner.run(ask(seed=123)), runner.run(ask(seed=123))
    assert first.images == second.images
    assert runner.run(ask(seed=124)).images != first.images


def test_each_image_of_a_batch_is_reproducible_alone(runner: Runner) -> None:
    batch = runner.run(ask(seed=10, num_images_per_prompt=2))
    assert batch.seeds == [10, 11]
    assert len(batch.images) == 2
    alone = runner.run(ask(seed=11))
    # Batched and single kernels may round differently: compare pixels with a small tolerance.
    difference = np.abs(pixels(batch.images[1]).astype(int) - pixels(alone.images[0]).astype(int))
    assert difference.max() <= 2


def test_drawn_seed_reproduces_the_image(runner: Runner) -> None:
    drawn = runner.run(ask(seed=None))
    assert runner.run(ask(seed=drawn.seeds[0])).images == drawn.images


@pytest.mark.parametrize("name", ["img2img", "AutoPipelineForImage2Image", "StableDiffusionImg2ImgPipeline", None])
def test_img2img(runner: Runner, name: str | None) -> None:
    result = runner.run(ask(pipeline=name, image=b64_image((200, 30, 30)), strength=0.6))
    assert result.meta["PIPELINE"] == "StableDiffusionImg2ImgPipeline"
    assert Image.open(io.BytesIO(result.images[0])).size == (64, 64)


def test_img2img_changes_with_the_input_image(runner: Runner) -> None:
    red = runner.run(ask(image=b64_image((200, 30, 30)), strength=0.5))
    blue = runner.run(ask(image=b64_image((30, 30, 200)), strength=0.5))
    assert red.images != blue.images


def test_image_urls_are_fetched_like_base64_images(models_dir: Path) -> None:
    """SPEC 1.1: with callInputs.is_url (native: any http(s) URL) the image inputs are fetched, over a connection
    to public addresses only unless ALLOW_PRIVATE_URLS (this server is on loopback)."""
    runner = Runner(Settings(model_id="builtin/tiny-sd-inpaint", models_dir=models_dir, allow_private_urls=True))
    runner.start()
    image, mask = encode_image(Image.new("RGB", (64, 64), (90, 90, 90))), encode_image(Image.new("RGB", (64, 64)))
    with file_server() as files:
        files.files |= {"/image.png": image, "/mask.png": mask, "/text.txt": b"not an image"}
        by_value = runner.run(ask(image=to_base64(image), mask_image=to_base64(mask)))
        envelope = {
            "modelInputs": {"prompt": "realistic field of grass", "num_inference_steps": STEPS, "seed": 1,
                            "init_image": f"{files.url}/image.png", "mask_image": f"{files.url}/mask.png"},
            "callInputs": {"is_url": True},
        }  # fmt: skip
        by_url = runner.run(from_legacy(envelope))
        assert by_url.images == by_value.images
        assert "download" in by_url.timings
        for path, message in [("/missing.png", "answered HTTP 404"), ("/text.txt", "not a valid image")]:
            with pytest.raises(InvalidInputs, match=message):
                runner.run(ask(image=f"{files.url}{path}", mask_image=to_base64(mask)))
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        files.files["/noise.png"] = encode_image(Image.fromarray(noise))  # about 12 kB: PNG cannot shrink noise
        capped = {"max_body_bytes": 1024, "allow_private_urls": True}
        small = Runner(Settings(model_id="builtin/tiny-sd-inpaint", models_dir=models_dir, **capped))
        small.start()
        with pytest.raises(InvalidInputs, match="more than the 1024 allowed"):
            small.run(ask(image=f"{files.url}/noise.png", mask_image=to_base64(mask)))
        guarded = Runner(Settings(model_id="builtin/tiny-sd-inpaint", models_dir=models_dir))
        guarded.start()
        with pytest.raises(InvalidInputs, match=r"non-public address 127\.0\.0\.1.*ALLOW_PRIVATE_URLS"):
            guarded.run(ask(image=f"{files.url}/image.png", mask_image=to_base64(mask)))
        assert [path for path, _ in files.requests].count("/image.png") == 1  # never by the guarded server


def test_inpaint_on_the_inpainting_model(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd-inpaint", models_dir=models_dir))
    runner.start()
    result = runner.run(ask(image=b64_image((90, 90, 90)), mask_image=b64_image((255, 255, 255))))
    assert result.meta["PIPELINE"] == "StableDiffusionInpaintPipeline"
    assert Image.open(io.BytesIO(result.images[0])).size == (64, 64)


def test_inpaint_needs_a_mask(runner: Runner) -> None:
    with pytest.raises(InvalidInputs, match="mask_image"):
        runner.run(ask(pipeline="inpaint", image=b64_image((1, 2, 3))))


def test_img2img_needs_an_image(runner: Runner) -> None:
    with pytest.raises(InvalidInputs, match="image: required"):
        runner.run(ask(pipeline="img2img"))


def test_sdxl_txt2img(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sdxl", models_dir=models_dir))
    runner.start()
    result = runner.run(ask(width=64, height=64))
    assert result.meta["PIPELINE"] == "StableDiffusionXLPipeline"
    assert result.nsfw is None  # SDXL has no safety checker
    assert Image.open(io.BytesIO(result.images[0])).size == (64, 64)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("Euler a", "EulerAncestralDiscreteScheduler"),
        ("euler", "EulerDiscreteScheduler"),
        ("DDIM", "DDIMScheduler"),
        ("LMS", "LMSDiscreteScheduler"),
        ("PNDM", "PNDMScheduler"),
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler"),
        ("UniPCMultistepScheduler", "UniPCMultistepScheduler"),
    ],
)
def test_schedulers_by_alias_or_class(runner: Runner, name: str, cls: str) -> None:
    result = runner.run(ask(scheduler=name))
    assert result.meta["SCHEDULER"] == cls


def test_unknown_scheduler(runner: Runner) -> None:
    with pytest.raises(InvalidScheduler) as caught:
        runner.run(ask(scheduler="NopeScheduler"))
    assert "Euler a" in caught.value.extra["available"]
    assert caught.value.code == "INVALID_SCHEDULER"
    # only what this model can build (GET /v1/schedulers' list): the alias LCM names a scheduler an SD model's
    # scheduler is not compatible with
    assert caught.value.extra["available"] == runner.schedulers()["schedulers"]
    assert "LCM" not in caught.value.extra["available"]


def test_unknown_pipeline_lists_the_available_ones(runner: Runner) -> None:
    with pytest.raises(NoSuchPipeline) as caught:
        runner.run(ask(pipeline="NotAPipeline"))
    available = caught.value.extra["available"]
    assert {"txt2img", "img2img", "inpaint", "StableDiffusionImg2ImgPipeline"} <= set(available)
    assert caught.value.status == 404


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("StableDiffusionXLPipeline", "is a stable-diffusion-xl pipeline; this model is stable-diffusion"),
        ("StableDiffusionControlNetPipeline", "pipeline; this model is stable-diffusion"),
        ("StableDiffusionAdapterPipeline", "needs components this model lacks: adapter"),
    ],
    ids=["other-family", "controlnet", "missing-component"],
)
def test_pipelines_the_model_cannot_run(runner: Runner, name: str, reason: str) -> None:
    with pytest.raises(NoSuchPipeline, match=reason):
        runner.run(ask(pipeline=name))


def test_derived_pipelines_share_the_weights(runner: Runner) -> None:
    model = runner.store.get(ask())
    pipelines = model.pipelines
    img2img = pipelines.build(pipelines.resolve("img2img"), pipelines.scheduler("DDIM"), safety_checker=True)
    assert img2img.unet is pipelines.base.unet
    assert img2img.vae is pipelines.base.vae
    assert img2img.text_encoder is pipelines.base.text_encoder
    assert img2img.scheduler is not pipelines.base.scheduler


def test_each_request_gets_a_fresh_scheduler_of_the_models_config(runner: Runner) -> None:
    """Schedulers are built once per kind and copied per request: a used one must not reach the next request."""
    from diffusers import DPMSolverMultistepScheduler

    pipelines = runner.store.get(ask()).pipelines
    first = pipelines.scheduler("DPM++ 2M Karras")
    first.set_timesteps(7)
    first.model_outputs[0] = torch.ones(1)
    second = pipelines.scheduler("dpm++ 2m karras")  # however it is spelled
    expected = DPMSolverMultistepScheduler.from_config(
        pipelines.components["scheduler"].config, algorithm_type="dpmsolver++", use_karras_sigmas=True
    )
    assert second is not first
    assert dict(second.config) == dict(expected.config)
    assert second.num_inference_steps is None
    assert second.model_outputs == [None] * second.config.solver_order
    assert torch.equal(second.sigmas, expected.sigmas)


def test_scheduler_choice_does_not_leak(runner: Runner) -> None:
    baseline = runner.run(ask(seed=5))
    runner.run(ask(seed=5, scheduler="Euler a"))
    assert runner.run(ask(seed=5)).images == baseline.images


def test_concurrent_requests_with_different_schedulers_get_what_they_get_alone(runner: Runner) -> None:
    names = ["Euler a", "DDIM", "DPM++ 2M", "LMS"]
    alone = {name: runner.run(ask(seed=9, scheduler=name)).images for name in names}
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = dict(zip(names, pool.map(lambda n: runner.run(ask(seed=9, scheduler=n)).images, names), strict=True))
    assert together == alone
    assert len({images[0] for images in alone.values()}) == len(names)


def test_safety_checker_off_per_request_does_not_leak(runner: Runner) -> None:
    assert runner.run(ask(safety_checker=False)).nsfw is None
    assert runner.run(ask()).nsfw == [False]


def test_non_image_input_names_the_field(runner: Runner) -> None:
    with pytest.raises(InvalidImage, match=r"^image: ") as caught:
        runner.run(ask(image=to_base64(b"definitely not an image")))
    assert caught.value.status == 422


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("JPEG", "JPEG"), ("WEBP", "WEBP"), ("PNG", "PNG")], ids=["jpeg", "webp", "png"]
)
def test_output_formats(runner: Runner, fmt: str, pil_format: str) -> None:
    result = runner.run(ask(image_format=fmt, image_quality=70))
    assert Image.open(io.BytesIO(result.images[0])).format == pil_format


def test_extra_pipeline_arguments_pass_through(runner: Runner) -> None:
    plain = runner.run(ask(seed=3))
    rescaled = runner.run(ask(seed=3, extra={"guidance_rescale": 0.7}))
    assert plain.images != rescaled.images


def test_clip_skip_encodes_from_an_earlier_layer_in_either_loop(runner: Runner) -> None:
    """diffusers' clip_skip reads `text_encoder.text_model`, which transformers 5's CLIPTextModel lacks (diffusers
    issue #14124): these requests failed. Ours and diffusers' own loop give one image, unlike no clip_skip (the
    tiny encoder has 2 layers: 1 is the most it can skip)."""
    clip_skip = 1
    ours = Runner(runner.settings, store=runner.store, steps=SharedSteps())
    plain = ours.run(ask(seed=3))
    skipped = ours.run(ask(seed=3, extra={"clip_skip": clip_skip}))
    theirs = runner.run(ask(seed=3, extra={"clip_skip": clip_skip}))  # no shared steps: diffusers' own loop
    assert (skipped.meta["LOOP"], theirs.meta["LOOP"]) == ("batched", "diffusers")
    assert skipped.images != plain.images
    np.testing.assert_array_equal(pixels(skipped.images[0]), pixels(theirs.images[0]))


def test_the_clip_text_model_alias_is_the_loaded_encoders_alone(runner: Runner) -> None:
    """The alias that clip_skip needs names the loaded encoder itself and nothing else: set on the class, it broke
    single-file checkpoint loading later in the process. It adds no child module, so no state dict key."""
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = runner.store.get(ask()).pipelines.components["text_encoder"]
    assert encoder.text_model is encoder
    assert not hasattr(CLIPTextModel, "text_model")
    fresh = CLIPTextModel(
        CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=10)
    )
    assert not hasattr(fresh, "text_model")
    assert "text_model" not in dict(encoder.named_children())
    assert not any(key.startswith("text_model.") for key in encoder.state_dict())


def test_unknown_pipeline_argument_is_refused(runner: Runner) -> None:
    with pytest.raises(InvalidInputs, match="not inputs of StableDiffusionPipeline: bogus"):
        runner.run(ask(extra={"bogus": 1}))


def test_pipeline_value_errors_are_invalid_inputs(runner: Runner) -> None:
    # (a negative prompt per prompt short is refused before the call now: limits.check_prompt_lists)
    with pytest.raises(InvalidInputs, match="rejected the inputs: The current scheduler class"):
        runner.run(ask(extra={"sigmas": [1.0, 0.5]}))  # the default scheduler takes no custom sigmas


def test_image_size_cap(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, max_image_pixels=64 * 64))
    runner.start()
    with pytest.raises(InvalidInputs, match="exceeds the limit"):
        runner.run(ask(width=128, height=128))


def test_progress_is_reported_per_step(runner: Runner) -> None:
    steps: list[tuple[int, int]] = []
    runner.run(ask(num_inference_steps=5), progress=lambda step, total: steps.append((step, total)))
    assert steps == [(i, 5) for i in range(1, 6)]


def test_cancel_stops_within_a_step(runner: Runner) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def progress(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        runner.run(ask(num_inference_steps=10), progress=progress, cancel=cancel)
    assert seen == [1, 2]


def test_other_model_is_a_mismatch(runner: Runner) -> None:
    with pytest.raises(ModelMismatch) as caught:
        runner.run(ask(model="builtin/tiny-sdxl"))
    assert caught.value.extra == {"requested": "builtin/tiny-sdxl", "available": ["builtin/tiny-sd"]}


def test_other_precision_is_a_mismatch(runner: Runner) -> None:
    with pytest.raises(ModelMismatch):
        runner.run(ask(precision="bf16"))


def test_runtime_downloads_switch_models(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, runtime_downloads=True))
    runner.start()
    assert runner.run(ask(model="builtin/tiny-sdxl")).meta["PIPELINE"] == "StableDiffusionXLPipeline"
    assert runner.run(ask()).meta["PIPELINE"] == "StableDiffusionPipeline"  # the configured model, as the original
    assert runner.run(ask(model="builtin/tiny-sd")).meta["PIPELINE"] == "StableDiffusionPipeline"


def test_no_model_at_all(models_dir: Path) -> None:
    runner = Runner(Settings(models_dir=models_dir, runtime_downloads=True))
    runner.start()
    with pytest.raises(NoModelId):
        runner.run(ask())


@pytest.mark.parametrize(
    "model_id", ["builtin/nope", "/no/such/dir", "no-such-org/no-such-model"], ids=["builtin", "dir", "hub"]
)
def test_unknown_models(models_dir: Path, model_id: str) -> None:
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir))
    with pytest.raises(ModelNotFound):
        runner.start()


def test_local_directory_model(runner: Runner, models_dir: Path) -> None:
    path = runner.store.most_recent.source if runner.store.most_recent else ""
    local = Runner(Settings(model_id=path, models_dir=models_dir))
    local.start()
    assert local.run(ask(seed=77)).images == runner.run(ask(seed=77)).images


def test_flagged_images_are_reported_and_blacked_out(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir))
    runner.start()
    checker = runner.store.get(ask()).pipelines.components["safety_checker"]
    # The tiny checker's thresholds make it never fire; lower them below any cosine so that it always does.
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)
    result = runner.run(ask())
    assert result.nsfw == [True]
    assert pixels(result.images[0]).max() == 0
    assert runner.run(ask(safety_checker=False)).nsfw is None


def test_a_model_loads_in_its_precision_without_deprecated_arguments(models_dir: Path) -> None:
    """diffusers 0.42 takes `dtype=` and warns at every load given the old `torch_dtype=`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, model_precision="bf16"))
        runner.start()
    assert runner.store.get(ask()).pipelines.base.unet.dtype == torch.bfloat16
    assert not [str(w.message) for w in caught if "torch_dtype" in str(w.message)]
