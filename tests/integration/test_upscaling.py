"""Upscaling on the CPU with `builtin/tiny-upscaler` (a seeded Real-ESRGAN Compact x4): through the runner, with
weights from the builtin, a local file and a local HTTP server (through the store's download rules)."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.errors import InvalidImage, InvalidInputs, ModelLoadError, ModelMismatch
from diffusers_api.imaging import encode_image, to_base64
from diffusers_api.models.builtin import build_tiny_upscaler
from diffusers_api.models.upscalers import TINY_UPSCALER, cached_path
from diffusers_api.runner import Runner
from diffusers_api.schema import UpscaleRequest
from support.servers import file_server


def b64_image(width: int = 12, height: int = 8) -> str:
    rows = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3) * 7
    return to_base64(encode_image(Image.fromarray(rows, "RGB")))


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def upscale(runner: Runner, **fields: object) -> tuple[Image.Image, dict, dict]:
    result = runner.run(UpscaleRequest(**({"image": b64_image(), "model": TINY_UPSCALER} | fields)))
    return decoded(result.images[0]), result.meta, result.timings


@pytest.fixture(scope="module")
def runner(models_dir: Path) -> Runner:
    return Runner(Settings(models_dir=models_dir))


def test_the_tiny_upscaler_makes_4x_deterministically(runner: Runner, models_dir: Path) -> None:
    image, meta, timings = upscale(runner)
    assert image.size == (48, 32)
    assert meta["output_size"] == [48, 32]
    assert meta["input_size"] == [12, 8]
    assert meta["ARCHITECTURE"] == "RealESRGAN Compact"
    assert meta["scale"] == 4
    assert {"decode", "inference", "encode"} <= set(timings)
    # another runner loads the same seeded weights again (from the file the first one wrote): the same pixels
    again, _, again_timings = upscale(Runner(Settings(models_dir=models_dir)))
    assert "loadModel" in again_timings
    assert np.array_equal(np.asarray(image), np.asarray(again))
    # the weights are random but the network adds its input, upsampled: not a blank image
    assert np.asarray(image).std() > 10


def test_another_scale_and_format(runner: Runner) -> None:
    image, meta, _ = upscale(runner, scale=2.5, image_format="jpg", image_quality=80)
    assert image.format == "JPEG"
    assert image.size == (30, 20)
    assert meta["scale"] == 2.5
    assert meta["image_format"] == "JPEG"


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"image": "not base64!"}, InvalidImage, "image: not valid base64"),
        ({"model": "RealESRGAN_x5"}, InvalidInputs, "available: RealESRGAN_x4plus, RealESRGAN_x4plus_anime_6B"),
        ({"face_enhance": True}, InvalidInputs, "face_enhance: face restoration (GFPGAN) needs facexlib"),
        ({"image": b64_image(40, 40)}, InvalidInputs, "160x160 = 25600 pixels, more than the 4096 allowed"),
    ],
    ids=["bad-base64", "unknown-upscaler", "face-enhance", "too-large-output"],
)
def test_bad_inputs_are_clear_errors(models_dir: Path, fields: dict, error: type[Exception], words: str) -> None:
    runner = Runner(Settings(models_dir=models_dir, max_image_pixels=64 * 64))
    with pytest.raises(error) as caught:
        upscale(runner, **fields)
    assert words in str(caught.value)
    assert getattr(caught.value, "status", None) == 422


def real_esrgan_pth(path: Path) -> Path:
    """The tiny upscaler's weights as Real-ESRGAN's releases ship them: a pickled {"params_ema": state dict}."""
    torch.save({"params_ema": build_tiny_upscaler()}, path)
    return path


def test_weights_from_a_local_file_and_from_a_url(runner: Runner, tmp_path: Path) -> None:
    expected, _, _ = upscale(runner)
    local = real_esrgan_pth(tmp_path / "local-x4.pth")
    with file_server() as files:
        files.files["/weights/x4.pth"] = local.read_bytes()
        url = f"{files.url}/weights/x4.pth"
        settings = Settings(
            models_dir=tmp_path / "models",
            upscaler_urls=f"by-path={local},by-url={url}",
            runtime_downloads=True,
            allow_private_urls=True,
        )
        by_url = Runner(settings)
        for name in ("by-path", "by-url"):
            image, meta, timings = upscale(by_url, model=name)
            assert np.array_equal(np.asarray(image), np.asarray(expected)), name
            assert meta["MODEL_ID"] == name
        assert "download" in timings
        cached = cached_path("by-url", url, settings.models_dir, ".pth")
        assert cached.is_file()
        # a new runner (a restart) reads the cached file: nothing is downloaded again
        _, _, timings = upscale(Runner(settings), model="by-url")
        assert "download" not in timings
        assert [path for path, _ in files.requests] == ["/weights/x4.pth"]


def levels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_tiles_give_the_whole_images_pixels(runner: Runner, models_dir: Path) -> None:
    """UPSCALE_TILE: tiles of 16 input pixels, each run with a margin wider than the tiny network sees, so the
    seams are the whole image's pixels (up to a level where a convolution of another size rounds differently)."""
    whole, meta, _ = upscale(runner, image=b64_image(64, 48))
    assert meta["tile"] is None
    tiled, tiled_meta, _ = upscale(Runner(Settings(models_dir=models_dir, upscale_tile=16)), image=b64_image(64, 48))
    assert tiled_meta["tile"] == 16
    assert tiled.size == whole.size == (256, 192)
    assert np.abs(levels(tiled) - levels(whole)).max() <= 1


class Tight:
    """An upscaler on a device with room for `most` input pixels: more is out of memory, as CUDA says it."""

    def __init__(self, model: Any, most: int) -> None:
        self.model, self.most, self.scale, self.calls = model, most, model.scale, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(batch.shape[-2:]))
        if batch.shape[-2] * batch.shape[-1] > self.most:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (as the test asks)")
        return self.model(batch)


def test_running_out_of_memory_upscales_in_ever_smaller_tiles(models_dir: Path) -> None:
    """The whole 128x96 image does not fit, tiles of 64 (with their margins, at most 80x80) do: the same pixels
    as the whole image. With room for less than the smallest tile, a clear error; other errors are not retried."""
    from diffusers_api import upscaling
    from diffusers_api.errors import PipelineError
    from diffusers_api.models.upscalers import ensure_tiny_upscaler, load_upscaler

    model = load_upscaler(ensure_tiny_upscaler(models_dir), TINY_UPSCALER)
    batch = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = model(batch)
        tight = Tight(model, most=80 * 80)
        output, tile = upscaling._run(tight, batch, None)
        assert tile == 64
        assert tight.calls[0] == (96, 128)
        assert len(tight.calls) == 1 + 4  # the whole image, then 4 tiles
        torch.testing.assert_close(output, whole, rtol=0, atol=1e-5)
        with pytest.raises(PipelineError, match=r"out of memory in tiles of 32 pixels \(OutOfMemoryError: CUDA"):
            upscaling._run(Tight(model, most=40 * 40), batch, None)

        def broken(batch: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("not memory")

        with pytest.raises(RuntimeError, match="not memory"):
            upscaling._run(broken, batch, None)


def test_an_esrgan_network_loads_like_real_esrgan_x4plus(tmp_path: Path) -> None:
    """RealESRGAN_x4plus and its anime_6B variant are ESRGAN (RRDB) networks: a tiny, seeded one, saved as their
    releases are (a .pth of {"params_ema": state dict}), is recognised by spandrel and upscales 4x."""
    from diffusers_api.models.upscalers import import_spandrel

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = ESRGAN(num_filters=8, num_blocks=1, scale=4)
    torch.save({"params_ema": network.state_dict()}, tmp_path / "rrdb.pth")
    runner = Runner(Settings(models_dir=tmp_path, upscaler_urls=f"rrdb={tmp_path / 'rrdb.pth'}"))
    image, meta, _ = upscale(runner, model="rrdb")
    assert image.size == (48, 32)
    assert meta["ARCHITECTURE"] == "ESRGAN"


def test_download_at_build_time_then_serve_without_runtime_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers_api.cli import main

    with file_server() as files:
        files.files["/x4.pth"] = real_esrgan_pth(tmp_path / "x4.pth").read_bytes()
        upscalers = f"mine={files.url}/x4.pth"
        for name, value in {
            "MODELS_DIR": tmp_path / "models",
            "UPSCALER_URLS": upscalers,
            "ALLOW_PRIVATE_URLS": 1,
        }.items():
            monkeypatch.setenv(name, str(value))
        monkeypatch.delenv("MODEL_ID", raising=False)
        assert main(["download", "--upscaler", "mine"]) == 0
        assert main(["download", "--upscaler", "nope"]) == 1
    said = capsys.readouterr()
    assert "upscaler mine: downloaded in " in said.out
    assert "download of upscaler nope failed (INVALID_INPUTS): unknown upscaler 'nope'; available: " in said.err
    image, _, timings = upscale(Runner(Settings(models_dir=tmp_path / "models", upscaler_urls=upscalers)), model="mine")
    assert image.size == (48, 32)
    assert "download" not in timings


def test_downloads_follow_runtime_downloads(tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path, upscaler_urls="remote=http://127.0.0.1:9/x4.pth")
    with pytest.raises(ModelMismatch, match="RUNTIME_DOWNLOADS=0 forbids downloading it"):
        upscale(Runner(settings), model="remote")


class _RunsCode:
    """Unpickled, it makes a directory: the proof that the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_pickled_code_in_a_pth_is_refused(runner: Runner, tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "pickled-code-ran"
    evil.write_bytes(pickle.dumps({"params_ema": _RunsCode(marker)}, protocol=2))  # torch.save's protocol
    with file_server() as files:
        files.files["/evil.pth"] = evil.read_bytes()
        settings = Settings(
            models_dir=tmp_path / "models",
            upscaler_urls=f"evil-file={evil},evil-url={files.url}/evil.pth",
            runtime_downloads=True,
            allow_private_urls=True,
        )
        for name in ("evil-file", "evil-url"):
            with pytest.raises(ModelLoadError, match="never arbitrary pickled objects") as caught:
                upscale(Runner(settings), model=name)
            assert "the pickle holds more than tensors: Trying to load unsupported GLOBAL posix.mkdir" in str(
                caught.value
            )
    assert not marker.exists()
    assert not list((tmp_path / "models" / "upscalers").glob("*.pth"))  # a refused download is not kept


# --- diffusers' own upscaler, served as a model through the generation path ---------------------------------


def tiny_sd_upscaler(directory: Path) -> Path:
    """A tiny, seeded StableDiffusionUpscalePipeline (stabilityai/stable-diffusion-x4-upscaler's layout: a UNet
    taking 4 latent + 3 image channels and the noise level as its class label, a VAE of scale factor 4)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    from diffusers_api.models import builtin

    with torch.random.fork_rng(devices=[]):
        tokenizer = builtin.build_clip_tokenizer()
        builtin._seed(builtin.SEED_UNET)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=7,
            out_channels=4,
            block_out_channels=builtin.UNET_CHANNELS,
            layers_per_block=1,
            norm_num_groups=builtin.UNET_NORM_GROUPS,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=builtin.TEXT_HIDDEN_SIZE,
            attention_head_dim=8,
            num_class_embeds=100,
        )
        pipe = StableDiffusionUpscalePipeline(
            vae=builtin._vae(scaling_factor=0.08333),
            text_encoder=builtin._text_encoder(builtin._text_config(tokenizer), builtin.SEED_TEXT_ENCODER),
            tokenizer=tokenizer,
            unet=unet,
            low_res_scheduler=DDPMScheduler(),
            scheduler=DDIMScheduler(prediction_type="v_prediction"),
            max_noise_level=99,
        )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def test_a_served_sd_upscaler_runs_through_generate(tmp_path: Path) -> None:
    """With an image and no PIPELINE, the model's own pipeline runs (there is no img2img variant of an upscaler),
    and an input smaller than a text-to-image model's minimum is fine: the UNet sees it at its own size."""
    from diffusers_api.schema import GenerateRequest

    model = tiny_sd_upscaler(tmp_path / "tiny-sd-upscaler")
    runner = Runner(Settings(model_id=str(model), models_dir=tmp_path / "models"))
    runner.start()
    result = runner.run(GenerateRequest(prompt="a cat", image=b64_image(8, 8), num_inference_steps=1, seed=3))
    assert result.meta["PIPELINE"] == "StableDiffusionUpscalePipeline"
    assert decoded(result.images[0]).size == (32, 32)
    with pytest.raises(InvalidInputs, match="not inputs of StableDiffusionUpscalePipeline: width"):
        runner.run(GenerateRequest(prompt="a cat", image=b64_image(8, 8), num_inference_steps=2, width=64))
