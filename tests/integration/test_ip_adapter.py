"""IP-Adapters (`ip_adapter`) on the tiny models with the builtin tiny adapters: the server's result is diffusers'
own `load_ip_adapter` + call, the loaded model's UNet is never touched (a concurrent plain request gives its alone
result) and its weights are not copied, and what cannot work is a clear error."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import Rendezvous, SharedSteps
from diffusers_api.errors import InvalidImage, InvalidInputs, ModelMismatch, ModelNotFound
from diffusers_api.imaging import encode_image, to_base64
from diffusers_api.models import archive
from diffusers_api.models.builtin import ensure_builtin
from diffusers_api.models.builtin_ip_adapter import WEIGHT_NAME, ensure_builtin_ip_adapter
from diffusers_api.models.ip_adapter import IPAdapterSpec, check_family, fetch_ip_adapter
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, GenerateResult, IPAdapter
from support.servers import ACCESS_KEY, REGION, SECRET_KEY, file_server, moto_s3, s3_client

SD, SDXL = "builtin/tiny-sd", "builtin/tiny-sdxl"
ADAPTERS = {SD: "builtin/tiny-ip-adapter", SDXL: "builtin/tiny-ip-adapter-sdxl"}
STEPS = 3


def b64_image(color: tuple[int, int, int], size: int = 40) -> str:
    return to_base64(encode_image(Image.new("RGB", (size, size), color)))


RED, BLUE = b64_image((200, 30, 30)), b64_image((30, 30, 200))


def runner_for(model_id: str, models_dir: Path, **settings: Any) -> Runner:
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir, **settings))
    runner.start()
    return runner


@pytest.fixture(scope="module")
def runners(models_dir: Path) -> dict[str, Runner]:
    return {model: runner_for(model, models_dir) for model in (SD, SDXL)}


@pytest.fixture(scope="module")
def sd_red(runners: dict[str, Runner]) -> GenerateResult:
    """tiny-sd with the red image prompt at scale 1: what several tests compare with."""
    return runners[SD].run(ask())


def ask(
    model: str = SD, prompt_image: str | list[str] | None = RED, scale: float = 1.0, **fields: Any
) -> GenerateRequest:
    ip = {"model": ADAPTERS[model], "image": prompt_image, "scale": scale} if prompt_image is not None else None
    return GenerateRequest(
        **({"prompt": "a red barn", "seed": 5, "num_inference_steps": STEPS, "ip_adapter": ip} | fields)
    )


def pixels(result: GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)


def unet_of(runner: Runner) -> Any:
    model = runner.store.most_recent
    assert model is not None
    return model.pipelines.components["unet"]


@pytest.mark.parametrize("model", [SD, SDXL])
def test_the_image_prompt_changes_the_result_and_scale_0_leaves_it_out(
    runners: dict[str, Runner], sd_red: GenerateResult, model: str
) -> None:
    runner = runners[model]
    plain = runner.run(ask(model, prompt_image=None))
    red = sd_red if model == SD else runner.run(ask(model))
    assert red.meta["IP_ADAPTER"] == {"model": ADAPTERS[model], "scale": 1.0}
    assert red.meta["LOOP"] == "diffusers"  # our batched loop does not run IP-Adapters: diffusers' call does
    assert red.images != plain.images
    if model == SD:  # another image prompt, another image
        assert runner.run(ask(model, prompt_image=BLUE)).images != red.images
    # diffusers skips an IP-Adapter at scale 0: its attention layers add nothing, the image is the plain one
    assert runner.run(ask(model, scale=0.0)).images == plain.images
    assert "IP_ADAPTER" not in plain.meta


@pytest.mark.parametrize("model", [SD, SDXL])
def test_img2img_and_inpaint_take_an_image_prompt(runners: dict[str, Runner], model: str) -> None:
    runner = runners[model]
    init = {"image": BLUE, "strength": 0.7}
    plain, prompted = runner.run(ask(model, prompt_image=None, **init)), runner.run(ask(model, **init))
    assert prompted.meta["PIPELINE"].endswith("Img2ImgPipeline")
    assert prompted.meta["IP_ADAPTER"]
    assert prompted.images != plain.images
    if model == SD:  # and inpainting
        mask = {"mask_image": b64_image((255, 255, 255), 64), "image": b64_image((30, 30, 200), 64)}
        inpainted = runner.run(ask(model, **mask))
        assert inpainted.meta["PIPELINE"] == "StableDiffusionInpaintPipeline"
        assert inpainted.meta["IP_ADAPTER"]["model"] == ADAPTERS[SD]


def test_the_result_is_diffusers_own(runners: dict[str, Runner], models_dir: Path) -> None:
    """The same request through plain diffusers: load_ip_adapter on the pipeline, set_ip_adapter_scale, call (two
    prompts, two image prompts for the one adapter)."""
    import torch
    from diffusers import DiffusionPipeline

    prompts = ["a red barn", "a blue lake"]
    ours = runners[SD].run(ask(scale=0.6, prompt_image=[RED, BLUE], prompt=prompts))
    pipe = DiffusionPipeline.from_pretrained(ensure_builtin(SD, models_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(ensure_builtin_ip_adapter(ADAPTERS[SD], models_dir)), "", WEIGHT_NAME)
    pipe.set_ip_adapter_scale(0.6)
    images = [Image.open(io.BytesIO(base64.b64decode(color))) for color in (RED, BLUE)]
    generators = [torch.Generator().manual_seed(seed) for seed in (5, 6)]
    theirs = pipe(prompts, num_inference_steps=STEPS, generator=generators, ip_adapter_image=[images]).images
    assert len(ours.images) == len(theirs) == 2
    for data, image in zip(ours.images, theirs, strict=True):
        assert np.abs(np.asarray(Image.open(io.BytesIO(data))).astype(int) - np.asarray(image).astype(int)).max() <= 1


def test_the_model_unet_is_untouched_and_its_weights_shared(runners: dict[str, Runner]) -> None:
    runner = runners[SDXL]
    runner.run(ask(SDXL))
    model = runner.store.most_recent
    assert model is not None
    base, variant = unet_of(runner), next(iter(model.ip_adapters.values()))
    shell = variant.pipelines.components["unet"]
    assert shell is not base
    assert base.encoder_hid_proj is None
    assert not any("IPAdapter" in type(p).__name__ for p in base.attn_processors.values())
    assert any("IPAdapter" in type(p).__name__ for p in shell.attn_processors.values())
    own = {name for name, _ in shell.named_parameters()} - {name for name, _ in base.named_parameters()}
    assert own
    assert all("processor" in name or name.startswith("encoder_hid_proj") for name in own)
    for name, tensor in base.named_parameters():  # no second copy: the very same tensors
        assert shell.get_parameter(name).data_ptr() == tensor.data_ptr()
    assert variant.pipelines.components["vae"] is model.pipelines.components["vae"]
    assert runner.store.resident_bytes() == model.bytes + variant.bytes
    assert model.describe()["ip_adapters"] == [variant.describe()]


def test_a_plain_request_beside_an_ip_adapter_one_gets_its_alone_result(runners: dict[str, Runner]) -> None:
    """The two share their UNet rounds (the batching rendezvous); the plain one must not see the adapter."""
    runner = runners[SD]
    plain, prompted = ask(prompt_image=None, seed=21), ask(seed=22)
    alone = [runner.run(plain), runner.run(prompted)]
    batcher = Rendezvous(max_wait_s=2.0)
    together = Runner(runner.settings, store=runner.store, steps=SharedSteps(batcher))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(together.run, [plain, prompted]))
    finally:
        together.steps.stop()  # type: ignore[union-attr]
    assert batcher.stats.rounds > 0
    for result, solo in zip(results, alone, strict=True):
        assert np.abs(pixels(result) - pixels(solo)).max() <= 1


def test_only_sd_and_sdxl_pipelines_take_an_ip_adapter() -> None:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLImg2ImgPipeline

    check_family(StableDiffusionXLImg2ImgPipeline)
    for cls, family in [(FluxPipeline, "flux"), (StableDiffusion3Pipeline, "stable-diffusion-3")]:
        with pytest.raises(InvalidInputs, match=f"ip_adapter: .*{cls.__name__} is {family} family") as caught:
            check_family(cls)
        assert caught.value.extra["field"] == "ip_adapter"


@pytest.mark.parametrize(
    ("adapter", "error", "message"),
    [
        ({"model": "builtin/tiny-ip-adapter-sdxl"}, InvalidInputs, "does not fit this model"),
        ({"model": "builtin/no-such-adapter"}, ModelNotFound, "unknown builtin IP-Adapter"),
        ({"model": "/etc"}, InvalidInputs, "outside MODELS_DIR and LOCAL_MODEL_ROOTS"),
        ({"model": "h94/IP-Adapter"}, InvalidInputs, "weight_name: required for the hub repository"),
        (
            {"model": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.safetensors"},
            ModelMismatch,
            "RUNTIME_DOWNLOADS=0 forbids downloading it",
        ),
        ({"model": "builtin/tiny-ip-adapter", "weight_name": "other.safetensors"}, ModelNotFound, "has no other"),
        ({"model": "builtin/tiny-ip-adapter", "image": "bm90IGFuIGltYWdl"}, InvalidImage, "ip_adapter.image"),
    ],
    ids=["other-family-adapter", "unknown-builtin", "outside-roots", "hub-without-file", "no-runtime-downloads",
         "missing-file", "not-an-image"],
)  # fmt: skip
def test_a_bad_ip_adapter_is_a_clear_error(
    runners: dict[str, Runner], adapter: dict[str, Any], error: type[Exception], message: str
) -> None:
    runner = runners[SD]
    model = runner.store.most_recent
    assert model is not None
    kept = list(model.ip_adapters)
    with pytest.raises(error, match=message):
        runner.run(ask(ip_adapter={"image": RED} | adapter))
    assert list(model.ip_adapters) == kept  # nothing half-made is kept


def cloud_settings(models_dir: Path, endpoint: str = "") -> Settings:
    return Settings(
        models_dir=models_dir,
        allow_private_urls=True,
        runtime_downloads=True,
        aws_s3_endpoint_url=endpoint or None,
        aws_s3_default_bucket="cache",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_default_region=REGION,
    )


def test_an_http_archive_is_fetched_once_and_runs_like_the_adapter(
    runners: dict[str, Runner], sd_red: GenerateResult, models_dir: Path
) -> None:
    """`url` is the adapter's cloud-cache archive (a tar.zst of its files, as MODEL_URL): fetched into MODELS_DIR,
    then used from there, with no download (RUNTIME_DOWNLOADS=0 is then no obstacle)."""
    packed = io.BytesIO()
    archive.pack(ensure_builtin_ip_adapter(ADAPTERS[SD], models_dir), packed)
    with file_server() as files:
        files.files["/style.tar.zst"] = packed.getvalue()
        adapter = {"model": "someone/style-adapter", "url": f"{files.url}/style.tar.zst", "image": RED}
        with pytest.raises(ModelNotFound, match="no IP-Adapter archive at"):
            fetch_ip_adapter(
                IPAdapterSpec("someone/other", url=f"{files.url}/missing.tar.zst"), cloud_settings(models_dir)
            )
        fetch_ip_adapter(IPAdapterSpec.of(IPAdapter.model_validate(adapter)), cloud_settings(models_dir))
        assert len(files.requests) == 2
    from_archive = runners[SD].run(ask(ip_adapter=adapter))
    assert from_archive.images == sd_red.images


def test_an_s3_archive_is_built_and_uploaded_then_a_fresh_server_downloads_it(models_dir: Path, tmp_path: Path) -> None:
    spec = IPAdapterSpec(ADAPTERS[SDXL], url="s3://")
    with moto_s3() as endpoint:
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket="cache")  # type: ignore[attr-defined]
        built = fetch_ip_adapter(spec, cloud_settings(models_dir, endpoint))
        key = "ip-adapters--builtin--tiny-ip-adapter-sdxl.tar.zst"
        assert s3.head_object(Bucket="cache", Key=key)["ContentLength"] > 0  # type: ignore[attr-defined]
        fresh = fetch_ip_adapter(spec, cloud_settings(tmp_path, endpoint))
    assert fresh == tmp_path / spec.cache_id
    assert not (tmp_path / "models--builtin--tiny-ip-adapter-sdxl").exists()  # from the archive, not generated
    assert (fresh / WEIGHT_NAME).read_bytes() == (built / WEIGHT_NAME).read_bytes()
    assert (fresh / "image_encoder" / "model.safetensors").is_file()
