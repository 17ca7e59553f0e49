"""Every input answered in the error format, on the tiny models: what a request may ask for is checked against
the model before anything runs, and before anything is downloaded for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from diffusers_api.config import Settings
from diffusers_api.errors import InvalidInputs, InvalidScheduler, ModelNotFound, NoSuchPipeline
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
    runner = Runner(
        Settings(model_id="builtin/tiny-sd", model_precision="bf16", models_dir=models_dir, runtime_downloads=True)
    )
    runner.start()
    assert runner.run(ask(model="builtin/tiny-sdxl")).meta["PRECISION"] == "bf16"
    assert runner.run(ask(model="builtin/tiny-sdxl", precision="fp32")).meta["PRECISION"] == "fp32"
    assert runner.run(ask()).meta["PRECISION"] == "bf16"


# --- sizes and prompts ------------------------------------------------------------------------------------------


def test_a_size_below_the_models_smallest_is_refused_naming_the_field_and_the_minimum(runner: Runner) -> None:
    with pytest.raises(InvalidInputs) as caught:
        runner.run(ask(width=8, height=64, guidance_scale=1))
    assert caught.value.message.startswith("width: 8 is less than 16, the smallest size builtin/tiny-sd makes")
    assert "VAE scale factor 4 x UNet downsampling 2 x 2" in caught.value.message
    assert caught.value.extra == {"field": "width", "minimum": 16}
    with pytest.raises(InvalidInputs, match="height: 8 is less than 16"):
        runner.run(ask(height=8, guidance_scale=1))


@pytest.mark.parametrize("model_id", ["builtin/tiny-sd", "builtin/tiny-sdxl"])
def test_the_smallest_size_makes_an_image_even_alone_without_guidance(models_dir: Path, model_id: str) -> None:
    """A batch of one (guidance_scale 1: no unconditional half) is where a 1x1 deepest layer failed."""
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir))
    runner.start()
    assert runner.run(ask(width=16, height=16, guidance_scale=1)).images


@pytest.mark.parametrize("value", [2, 100, -1, 1.5, "1", True], ids=repr)
@pytest.mark.parametrize("model_id", ["builtin/tiny-sd", "builtin/tiny-sdxl"])
def test_a_clip_skip_past_the_text_encoders_layers_is_refused_naming_the_range(
    models_dir: Path, model_id: str, value: object
) -> None:
    """The tiny CLIP text encoders have 2 layers: 0 or 1 can be skipped. diffusers indexes their hidden states with
    clip_skip unchecked, and a 100 was a 500 (IndexError)."""
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir))
    runner.start()
    with pytest.raises(InvalidInputs) as caught:
        runner.run(ask(extra={"clip_skip": value}))
    assert caught.value.message.startswith(f"clip_skip: {value!r} is not a whole number from 0 to 1")
    assert caught.value.extra == {"field": "clip_skip", "maximum": 1}
    assert runner.run(ask(extra={"clip_skip": 1})).images


def test_an_input_image_below_the_smallest_size_is_refused(runner: Runner) -> None:
    from PIL import Image

    from diffusers_api.imaging import encode_image, to_base64

    tiny = to_base64(encode_image(Image.new("RGB", (8, 8), (200, 30, 30))))
    with pytest.raises(InvalidInputs, match="image: its width 8 is less than 16") as caught:
        runner.run(ask(image=tiny, strength=0.5, guidance_scale=1))
    assert caught.value.extra == {"field": "image", "minimum": 16}


@pytest.mark.parametrize("model_id", ["builtin/tiny-sd3", "builtin/tiny-flux"])
def test_a_strength_of_0_on_a_flow_matching_model_is_refused(models_dir: Path, model_id: str) -> None:
    """It leaves no step to denoise: SD3's img2img checks none and failed on the empty timesteps (a 500)."""
    from PIL import Image

    from diffusers_api.imaging import encode_image, to_base64

    runner = Runner(Settings(model_id=model_id, models_dir=models_dir))  # diffusers' own loop
    runner.start()
    image = to_base64(encode_image(Image.new("RGB", (32, 32), (200, 30, 30))))
    with pytest.raises(InvalidInputs) as caught:
        runner.run(ask(image=image, strength=0, width=32, height=32))
    assert caught.value.message.startswith("strength 0 x num_inference_steps 2 = 0: less than one denoising step")
    assert runner.run(ask(image=image, strength=0.01, width=32, height=32)).images  # rounded up to one step


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"prompt": "a" * 10_001}, "prompt"),
        ({"negative_prompt": "a" * 10_001}, "negative_prompt"),
        ({"prompt": ["short", "a" * 10_001]}, "prompt[1]"),
        ({"extra": {"prompt_2": "a" * 10_001}}, "prompt_2"),
    ],
    ids=["prompt", "negative", "list", "extra"],
)
def test_a_prompt_over_the_limit_is_refused_naming_the_field_and_the_limit(
    runner: Runner, fields: dict, where: str
) -> None:
    with pytest.raises(InvalidInputs) as caught:
        runner.run(ask(**fields))
    message = f"{where}: 10001 characters, more than the 10000 allowed (MAX_PROMPT_CHARS)"
    assert caught.value.message == message
    assert caught.value.extra == {"field": where.split("[")[0], "limit": 10_000, "setting": "MAX_PROMPT_CHARS"}


@pytest.mark.parametrize(
    ("model_id", "fields", "message"),
    [
        ("builtin/tiny-pixart", {"prompt": ["a", "b"], "negative_prompt": ["c"]}, "negative_prompt: 1 given for 2"),
        ("builtin/tiny-pixart", {"negative_prompt": ["c", "d"]}, "negative_prompt: 2 given for 1"),
        ("builtin/tiny-sdxl", {"extra": {"prompt_2": ["a", "b", "c"]}}, "prompt_2: 3 given for 1"),
        ("builtin/tiny-sd3", {"extra": {"negative_prompt_3": ["a", "b"]}}, "negative_prompt_3: 2 given for 1"),
        ("builtin/tiny-flux", {"prompt": ["a", "b"], "extra": {"prompt_2": ["c"]}}, "prompt_2: 1 given for 2"),
    ],
    ids=["pixart-negative", "pixart-negative-for-one", "sdxl-prompt-2", "sd3-negative-3", "flux-prompt-2"],
)
def test_a_list_of_prompts_of_another_length_is_refused_naming_it(
    models_dir: Path, model_id: str, fields: dict, message: str
) -> None:
    """diffusers checks the lengths for some pipelines only: these failed concatenating embeddings (500s)."""
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir))
    runner.start()
    small = {"width": 32, "height": 32} | ({"extra": {"use_resolution_binning": False}} if "pixart" in model_id else {})
    with pytest.raises(InvalidInputs) as caught:
        runner.run(ask(**(small | fields)))
    assert caught.value.message == f"{message} prompts; give one per prompt, or one string for all"


def test_the_prompt_limit_is_a_setting(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, max_prompt_chars=20))
    runner.start()
    assert runner.run(ask(prompt="a" * 20)).images
    with pytest.raises(InvalidInputs, match="more than the 20 allowed"):
        runner.run(ask(prompt="a" * 21))


def test_a_request_for_more_images_than_max_images_is_refused_before_it_runs(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, max_images=4))
    runner.start()
    assert len(runner.run(ask(prompt=["a", "b"], num_images_per_prompt=2)).images) == 4
    with pytest.raises(InvalidInputs) as caught:
        runner.run(ask(prompt=["a"] * 5))
    assert caught.value.message == (
        "this request makes 5 images (5 prompt(s) x num_images_per_prompt 1), more than the 4 allowed (MAX_IMAGES)"
    )
    assert caught.value.extra == {"field": "prompt", "limit": 4, "setting": "MAX_IMAGES"}
    with pytest.raises(InvalidInputs, match="makes 6 images") as caught:
        runner.run(ask(prompt="a", num_images_per_prompt=6))
    assert caught.value.extra["field"] == "num_images_per_prompt"


# --- model directories a request may name ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def switching(models_dir: Path) -> Runner:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, runtime_downloads=True))
    runner.start()
    return runner


def looks_like_a_model(directory: Path) -> Path:
    """A directory with a model_index.json and a .safetensors file that is no such thing: reading either fails."""
    (directory / "unet").mkdir(parents=True)
    (directory / "model_index.json").write_text("not json")
    (directory / "unet" / "weights.safetensors").write_bytes(b"\xff" * 64)
    return directory


@pytest.mark.parametrize("name", ["..", "/etc", "~", "./", "outside"], ids=["parent", "etc", "home", "cwd", "tmp"])
def test_a_request_may_not_name_a_directory_outside_the_model_roots(
    switching: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(looks_like_a_model(tmp_path / "work"))  # `..` and `./` would read a model-like tree
    model = str(looks_like_a_model(tmp_path / "elsewhere")) if name == "outside" else name
    with pytest.raises(InvalidInputs) as caught:
        switching.run(ask(model=model))
    assert caught.value.status == 422
    assert caught.value.extra == {"field": "model", "setting": "LOCAL_MODEL_ROOTS"}
    assert "outside MODELS_DIR and LOCAL_MODEL_ROOTS" in caught.value.message


@pytest.mark.parametrize(
    "name", ["http://127.0.0.1:1/x", " ", "a\x00b", "a/" + "b" * 5000], ids=["url", "space", "nul", "too-long"]
)
def test_a_model_id_that_no_hub_repository_can_have_is_invalid_inputs(switching: Runner, name: str) -> None:
    """The hub's own check of the name refused these (a 502, STORAGE_ERROR), and a name too long for a path was an
    OSError from Path.is_dir (a 500)."""
    with pytest.raises(InvalidInputs) as caught:
        switching.run(ask(model=name))
    assert caught.value.message.startswith(f"{name!r} is not a hub repository id: ")
    assert caught.value.extra == {"requested": name}


def test_a_variant_the_model_has_no_files_of_is_not_found(switching: Runner) -> None:
    """diffusers refuses it with a ValueError: it was a MODEL_LOAD_ERROR, a 500."""
    with pytest.raises(ModelNotFound) as caught:
        switching.run(ask(variant="fp16"))
    assert "no weight files of variant 'fp16'" in caught.value.message
    assert caught.value.status == 404


@pytest.mark.parametrize("variant", ["../x", "a/b", "fp16.", "x" * 65], ids=["dot-dot", "slash", "dot", "long"])
def test_a_variant_is_a_word(variant: str) -> None:
    """It is put into file names (`<name>.<variant>.safetensors`): a `/` or `..` there would leave the model."""
    with pytest.raises(ValidationError, match="variant"):
        ask(variant=variant)
    assert ask(variant="").variant == ""  # none, as the original's clients send it


def test_a_link_inside_the_models_dir_to_elsewhere_is_outside(switching: Runner, tmp_path: Path) -> None:
    link = switching.settings.models_dir / "models--linked--elsewhere"
    link.symlink_to(looks_like_a_model(tmp_path / "elsewhere"), target_is_directory=True)
    try:
        with pytest.raises(InvalidInputs, match="outside MODELS_DIR and LOCAL_MODEL_ROOTS"):
            switching.run(ask(model=str(link)))
    finally:
        link.unlink()


@pytest.mark.parametrize("field", ["checkpoint_url", "hf_model_id"])
def test_other_paths_a_request_names_are_held_to_the_roots_too(switching: Runner, tmp_path: Path, field: str) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\xff" * 64)
    given = {"checkpoint_url": str(checkpoint)} if field == "checkpoint_url" else {"hf_model_id": str(tmp_path)}
    with pytest.raises(InvalidInputs) as caught:
        switching.run(ask(model="some/model", **given))
    assert caught.value.extra == {"field": field, "setting": "LOCAL_MODEL_ROOTS"}


def test_a_directory_in_the_roots_that_is_no_model_is_not_found(switching: Runner) -> None:
    from diffusers_api.errors import ModelNotFound

    stray = switching.settings.models_dir / "not-a-model"
    stray.mkdir(exist_ok=True)
    with pytest.raises(ModelNotFound, match=r"no model_index\.json"):
        switching.run(ask(model=str(stray)))


def test_a_model_directory_in_an_allowed_root_loads(models_dir: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "team-models"
    shutil.copytree(models_dir / "models--builtin--tiny-sd", root / "sd")
    served = {"model_id": "builtin/tiny-sd", "models_dir": models_dir, "runtime_downloads": True}
    runner = Runner(Settings(**served, local_model_roots=[root]))
    runner.start()
    assert runner.run(ask(model=str(root / "sd"))).meta["MODEL_ID"] == str(root / "sd")
    with pytest.raises(InvalidInputs, match="LOCAL_MODEL_ROOTS"):
        Runner(Settings(**served)).run(ask(model=str(root / "sd")))
