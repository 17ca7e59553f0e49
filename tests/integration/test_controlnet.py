"""ControlNets and T2I-Adapters on the tiny models: the runner's result equals diffusers' own ControlNet (or
T2I-Adapter) pipeline called alone; batched with a plain request, each gets its alone result; bad requests are
clear errors; control models are cached in the store's LRU under the memory budget."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import Rendezvous, SharedSteps
from diffusers_api.errors import InvalidInputs, ModelMismatch, ModelNotFound
from diffusers_api.models import archive
from diffusers_api.models.builtin import build_builtin, builtin_dir, ensure_builtin
from diffusers_api.models.controls import control_pipeline
from diffusers_api.models.sources import fetch
from diffusers_api.models.spec import ModelSpec
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, GenerateResult
from diffusers_api.schema.controls import ControlInput
from support.servers import file_server

# What test_batching.py allows a batched image (batched kernels round differently in the last bits).
MAX_LEVEL_DIFFERENCE = 1
MAX_DIFFERING_SHARE = 0.01
SIZE = 32
CONTROLNET, CONTROLNET_XL, ADAPTER = (
    "builtin/tiny-controlnet",
    "builtin/tiny-controlnet-sdxl",
    "builtin/tiny-t2i-adapter",
)


def _runner(models_dir: Path, model_id: str, **settings: Any) -> Runner:
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir, **settings))
    runner.start()
    return runner


@pytest.fixture(scope="module")
def sd(models_dir: Path) -> Runner:
    return _runner(models_dir, "builtin/tiny-sd")


@pytest.fixture(scope="module")
def sdxl(models_dir: Path) -> Runner:
    return _runner(models_dir, "builtin/tiny-sdxl")


def condition() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    image.paste((255, 255, 255), (8, 8, 24, 24))
    return image


def init_image() -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), (180, 40, 40))


def mask() -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 0)
    image.paste(255, (0, 0, SIZE // 2, SIZE))
    return image


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(result: GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)


def request(task: str = "txt2img", steps: int = 2, **fields: Any) -> GenerateRequest:
    images = {"img2img": {"image": b64(init_image()), "strength": 0.7}}
    images["inpaint"] = images["img2img"] | {"mask_image": b64(mask()), "strength": 1.0}
    base: dict[str, Any] = {"prompt": "a red barn", "seed": 7, "num_inference_steps": steps}
    base |= {"width": SIZE, "height": SIZE} if task == "txt2img" else {}  # the others take the init image's
    base |= {"pipeline": task, "scheduler": "Euler", "safety_checker": False}
    return GenerateRequest(**base | images.get(task, {}) | fields)


def diffusers_alone(runner: Runner, req: GenerateRequest) -> np.ndarray:
    """diffusers' own ControlNet / T2I-Adapter pipeline, built with from_pipe over the model and called alone."""
    assert req.controlnet is not None
    model = runner.store.get(req)
    module = runner.store.controls(req.controlnet, model)[0].module
    pipe_cls = control_pipeline(model.pipelines.resolve(req.pipeline or "txt2img"), req.controlnet)
    role = "controlnet" if "ControlNet" in pipe_cls.__name__ else "adapter"
    options: dict[str, Any] = {role: module, "scheduler": model.pipelines.scheduler("Euler")}
    if "safety_checker" in model.pipelines.components:
        options |= {"safety_checker": None, "requires_safety_checker": False}
    pipe = pipe_cls.from_pipe(model.pipelines.base, **options)
    entry = req.controlnet[0]
    kwargs: dict[str, Any] = {"prompt": req.prompt, "num_inference_steps": req.num_inference_steps}
    kwargs |= {"width": SIZE, "height": SIZE} if req.image is None else {}
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(7)]
    if role == "adapter":
        kwargs |= {"image": condition(), "adapter_conditioning_scale": entry.scale}
    else:
        kwargs |= {"controlnet_conditioning_scale": entry.scale}
        kwargs |= {"control_guidance_start": entry.start, "control_guidance_end": entry.end}
        if req.image is None:
            kwargs["image"] = condition()
        else:
            kwargs |= {"control_image": condition(), "image": init_image(), "strength": req.strength}
            kwargs |= {"mask_image": mask()} if req.mask_image else {}
    return np.asarray(pipe(**kwargs).images[0]).astype(int)


def control(model: str = CONTROLNET, **fields: Any) -> dict[str, Any]:
    return {"model": model, "image": b64(condition())} | fields


def shared_runner(runner: Runner, batcher: Rendezvous) -> tuple[Runner, SharedSteps]:
    steps = SharedSteps(batcher)
    return Runner(runner.settings, store=runner.store, steps=steps), steps


# --- equal to diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "task", "entry"),
    [
        ("sd", "txt2img", control(scale=0.8, start=0.0, end=0.6)),
        ("sd", "inpaint", control()),
        ("sd", "txt2img", control(ADAPTER, type="t2i", scale=0.6)),
        ("sdxl", "img2img", control(CONTROLNET_XL)),
    ],
    ids=["sd-txt2img", "sd-inpaint", "sd-t2i-adapter", "sdxl-img2img"],
)
def test_alone_equals_diffusers_pipeline(
    family: str, task: str, entry: dict[str, Any], sd: Runner, sdxl: Runner
) -> None:
    base = {"sd": sd, "sdxl": sdxl}[family]
    req = request(task, controlnet=entry)
    shared, steps = shared_runner(base, Rendezvous(max_wait_s=5.0))
    try:
        reported: list[tuple[int, int]] = []
        result = shared.run(req, lambda step, total: reported.append((step, total)))  # through the rendezvous, alone
    finally:
        steps.stop()
    assert result.meta["LOOP"] == "diffusers"
    step, steps = reported[-1]  # progress from every kind of pipeline, T2I-Adapters' older callback included
    assert step == steps >= 1
    assert "ControlNet" in result.meta["PIPELINE"] or "Adapter" in result.meta["PIPELINE"]
    assert result.meta["CONTROLNET"][0]["model"] == entry["model"]
    ours = pixels(result)
    assert np.array_equal(ours, diffusers_alone(base, req))
    plain = pixels(base.run(request(task)))
    assert not np.array_equal(ours, plain)  # the control really steered the image


def test_zero_residuals_give_exactly_the_plain_forward(sd: Runner) -> None:
    """Rows without control get zero residuals in a merged forward: the UNet then computes what it would alone."""
    model = sd.store.get(request())
    unet = model.pipelines.components["unet"]
    sample, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    t = torch.tensor([500.0, 500.0])
    controlnet = sd.store.controls([ControlInput(**control())], model)[0].module
    with torch.inference_mode():
        down, mid = controlnet(sample, t, hidden, controlnet_cond=torch.rand(2, 3, 32, 32), return_dict=False)
        plain = unet(sample, t, encoder_hidden_states=hidden, return_dict=False)[0]
        zeros = unet(
            sample, t, encoder_hidden_states=hidden, return_dict=False,
            down_block_additional_residuals=tuple(torch.zeros_like(d) for d in down),
            mid_block_additional_residual=torch.zeros_like(mid),
        )[0]  # fmt: skip
        intrablock = unet(
            sample, t, encoder_hidden_states=hidden, return_dict=False,
            down_intrablock_additional_residuals=[torch.zeros(2, 32, 4, 4), torch.zeros(2, 64, 4, 4)],
        )[0]  # fmt: skip
    assert torch.equal(zeros, plain)
    assert torch.equal(intrablock, plain)


def test_control_request_batched_with_a_plain_one_gets_its_alone_result(sd: Runner) -> None:
    """The plain request runs in our loop, the ControlNet one in diffusers' ControlNet loop: their UNet steps meet in
    one forward (two guided rows each), the ControlNet residuals on the control request's rows only."""
    controlled, plain = request(controlnet=control()), request(steps=5, prompt="blue sky", seed=3)
    alone = [pixels(sd.run(controlled)), pixels(sd.run(plain))]
    batcher = Rendezvous(max_wait_s=5.0)
    shared, steps = shared_runner(sd, batcher)
    joined = threading.Event()

    def hold_until_the_control_request_joins(step: int, total: int) -> None:
        # on the loop's thread: the plain request waits after its first step for the other to join the rendezvous
        deadline = time.monotonic() + 60
        while step == 1 and batcher.participants < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        joined.set()

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            second = pool.submit(shared.run, plain, hold_until_the_control_request_joins)
            first = pool.submit(shared.run, controlled)
            results = [first.result(), second.result()]
    finally:
        steps.stop()
    assert [r.meta["LOOP"] for r in results] == ["diffusers", "batched"]
    assert 4 in batcher.stats.rows  # two guided rows from each request in one forward
    for together, solo in zip(results, alone, strict=True):
        difference = np.abs(pixels(together) - solo)
        assert difference.max() <= MAX_LEVEL_DIFFERENCE
        assert (difference > 0).mean() <= MAX_DIFFERING_SHARE


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "task", "fields", "error", "message"),
    [
        ("sd", "txt2img", {"controlnet": control(ADAPTER)}, InvalidInputs, "is a T2IAdapter, not a ControlNetModel"),
        ("sd", "txt2img", {"controlnet": control(CONTROLNET_XL)}, InvalidInputs, "does not fit this model's UNet"),
        ("sd", "img2img", {"controlnet": control(ADAPTER, type="t2i")}, InvalidInputs, "text-to-image only"),
        ("sd", "txt2img", {"controlnet": control(ADAPTER, type="t2i", end=0.5)}, InvalidInputs, "`end` must be 1"),
        ("sd", "txt2img", {"controlnet": control("builtin/tiny-nothing")}, ModelNotFound, "not a built-in control"),
        ("sd", "txt2img", {"controlnet": control("/etc")}, InvalidInputs, "'/etc' is a path outside MODELS_DIR"),
        ("sd", "txt2img", {"controlnet": control("../x")}, InvalidInputs, "'../x' is a path outside MODELS_DIR"),
        ("sd", "txt2img", {"controlnet": control("acme/not-here")}, ModelMismatch, "RUNTIME_DOWNLOADS=0 forbids"),
        (
            "sdxl", "img2img", {"controlnet": control(CONTROLNET_XL), "strength": 0.2, "num_inference_steps": 3},
            InvalidInputs, "strength 0.2 x num_inference_steps 3 = 0.6: less than one denoising step",
        ),
        (
            "sdxl", "img2img", {"strength": 0.2, "num_inference_steps": 3},
            InvalidInputs, "strength 0.2 x num_inference_steps 3 = 0.6: less than one denoising step",
        ),
    ],
    ids=[
        "wrong-type", "wrong-family", "t2i-img2img", "t2i-end", "unknown-builtin", "outside-roots", "dot-dot",
        "no-runtime-downloads", "sdxl-img2img-no-step-left",
        "sdxl-img2img-plain-no-step-left",
    ],
)  # fmt: skip
def test_bad_requests_are_clear_errors(
    sd: Runner, sdxl: Runner, family: str, task: str, fields: dict[str, Any], error: type, message: str
) -> None:
    base = {"sd": sd, "sdxl": sdxl}[family]
    with pytest.raises(error) as caught:
        base.run(request(task, **fields))
    assert message in caught.value.message
    assert 400 <= caught.value.status < 500


def test_controlnet_with_an_image_prompt(sd: Runner) -> None:
    """ControlNet pipelines take an IP-Adapter's image prompt too; SD's T2I-Adapter pipeline does not: a 422."""
    prompt = {"model": "builtin/tiny-ip-adapter", "image": b64(init_image())}
    both = sd.run(request(controlnet=control(), ip_adapter=prompt))
    assert both.meta["IP_ADAPTER"]["model"] == "builtin/tiny-ip-adapter"
    assert both.meta["CONTROLNET"][0]["model"] == CONTROLNET
    with pytest.raises(InvalidInputs, match="StableDiffusionAdapterPipeline takes no ip_adapter image prompt"):
        sd.run(request(controlnet=control(ADAPTER, type="t2i"), ip_adapter=prompt))


def test_only_sd_and_sdxl_pipelines_take_controls() -> None:
    flux = type("FluxPipeline", (), {})
    with pytest.raises(InvalidInputs, match="not with FluxPipeline"):
        control_pipeline(flux, [ControlInput(**control())])
    sd_img2img = diffusers.StableDiffusionImg2ImgPipeline
    assert (
        control_pipeline(sd_img2img, [ControlInput(**control())]).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    )


def test_a_directory_inside_models_dir(models_dir: Path, tmp_path: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, local_model_roots=[tmp_path]))
    model = runner.store.load_default()
    assert model is not None
    with pytest.raises(ModelNotFound, match="does not exist"):
        runner.store.controls([ControlInput(**control(str(tmp_path / "missing")))], model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"holds no config\.json"):
        runner.store.controls([ControlInput(**control(str(tmp_path / "empty")))], model)
    copy = tmp_path / "copy"
    shutil.copytree(ensure_builtin(CONTROLNET, models_dir), copy)
    assert runner.store.controls([ControlInput(**control(str(copy)))], model)[0].spec.source == str(copy)


def test_a_control_model_is_no_pipeline(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, runtime_downloads=True)
    with pytest.raises(
        ModelNotFound, match="is a control model, not a pipeline: name it in the request's `controlnet`"
    ):
        fetch(ModelSpec(model_id=CONTROLNET), settings)


def test_hub_control_not_on_disk_with_runtime_downloads_offline(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, runtime_downloads=True, offline=True))
    model = runner.store.load_default()
    assert model is not None
    with pytest.raises(ModelNotFound, match="OFFLINE=1 forbids fetching it"):
        runner.store.controls([ControlInput(**control("acme/not-here"))], model)


# --- the store ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", [CONTROLNET, CONTROLNET_XL, ADAPTER])
def test_control_builtins_are_seeded(model_id: str) -> None:
    first, second = build_builtin(model_id), build_builtin(model_id)
    weights = dict(first.state_dict())
    assert weights.keys() == second.state_dict().keys()
    assert all(torch.equal(weights[name], value) for name, value in second.state_dict().items())
    assert all(float(value.abs().max()) > 0 for name, value in weights.items() if name.endswith("weight"))


def test_controls_are_cached_and_share_the_memory_budget(models_dir: Path) -> None:
    probe = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir))
    model = probe.store.load_default()
    assert model is not None
    net, adapter = ControlInput(**control()), ControlInput(**control(ADAPTER, type="t2i"))
    first = probe.store.controls([net], model)[0]
    assert probe.store.controls([net], model)[0] is first  # cached: loaded once
    sizes = (model.bytes, first.bytes, probe.store.controls([adapter], model)[0].bytes)
    assert probe.store.describe()["controls"][0]["model"] == ADAPTER  # most recently used first

    # Room for the model and the larger control model, not for both control models: the least recently used goes.
    budget = sizes[0] + max(sizes[1:]) + 1
    store = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir, model_memory_budget=budget)).store
    model = store.load_default()
    assert model is not None
    store.controls([net], model)
    store.controls([adapter], model)
    assert [c.spec.source for c in store.resident_controls] == [ADAPTER]
    assert [m.spec.model_id for m in store.resident] == ["builtin/tiny-sd"]  # the served model stays
    assert store.resident_bytes() <= budget


def test_control_from_an_archive_url(models_dir: Path, tmp_path: Path) -> None:
    ensure_builtin(CONTROLNET, models_dir)
    packed = io.BytesIO()
    archive.pack(builtin_dir(CONTROLNET, models_dir), packed)
    settings = {"runtime_downloads": True, "allow_private_urls": True}
    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=tmp_path, **settings))
    model = runner.store.load_default()
    assert model is not None
    with file_server() as files:
        files.files["/cn.tar.zst"] = packed.getvalue()
        entry = ControlInput(url=f"{files.url}/cn.tar.zst", image=b64(condition()))
        timings: dict[str, float] = {}
        loaded = runner.store.controls([entry], model, timings)[0]
        assert "download" in timings
        assert (tmp_path / "controls--cn" / "config.json").is_file()
        reference = runner.store.controls([ControlInput(**control())], model)[0].module
        assert all(torch.equal(a, b) for a, b in zip(loaded.module.parameters(), reference.parameters(), strict=True))
        fetched = len(files.requests)
        runner.store.controls([entry], model)
        assert len(files.requests) == fetched  # resident: no second download
