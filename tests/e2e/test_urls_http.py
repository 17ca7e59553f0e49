"""What a legacy client sends by URL (callInputs.lora_weights, is_url images), through the real server over real
HTTP, the files served by a local HTTP server."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from diffusers_api.imaging import encode_image
from diffusers_api.models.builtin import ensure_builtin
from support.adapters import make_lora
from support.processes import Process, serving
from support.servers import FileServer, file_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def files(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    made = tmp_path_factory.mktemp("files")
    with file_server() as server:
        lora = make_lora(ensure_builtin("builtin/tiny-sd", models_dir), made / "lora", seed=7)
        server.files["/style.safetensors"] = lora.read_bytes()
        server.files["/red.png"] = encode_image(Image.new("RGB", (64, 64), (200, 30, 30)))
        half = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
        half.paste((200, 30, 30, 255), (0, 0, 16, 32))
        server.files["/half.png"] = encode_image(half)  # the right half transparent: to outpaint
        yield server


@pytest.fixture(scope="module")
def server(models_dir: Path, files: FileServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    env = {"ALLOW_PRIVATE_URLS": "1"}  # the file server listens on loopback
    with serving(models_dir, tmp_path_factory.mktemp("urls") / "server.log", env) as process:
        yield process


def legacy(server: Process, model_inputs: dict[str, object], call_inputs: dict[str, object]) -> dict:
    inputs = {"prompt": "a red barn", "num_inference_steps": 4, "seed": 3} | model_inputs
    response = httpx.post(f"{server.url}/", json={"modelInputs": inputs, "callInputs": call_inputs}, timeout=120)
    assert response.status_code == 200, response.text
    body: dict = response.json()
    return body


def pixels(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image_base64"])))).astype(int)


def test_a_lora_by_url_as_the_original_server_took_it(server: Process, files: FileServer) -> None:
    url = f"{files.url}/style.safetensors"
    plain = legacy(server, {}, {})
    weighed = legacy(server, {}, {"lora_weights": f"{url}#fname=style.safetensors&scale=0.5"})
    assert weighed["$meta"]["LORA_WEIGHTS"] == [{"url": url, "scale": 0.5}]
    assert not np.array_equal(pixels(weighed), pixels(plain))
    again = legacy(server, {"cross_attention_kwargs": '{"scale": 0.5}'}, {"lora_weights": url})
    assert np.array_equal(pixels(again), pixels(weighed))  # the same variant, weighed the newer way
    assert "download" not in again["$timings"]  # fetched once
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    variants = models["loaded"][0]["variants"]
    assert [variant["loras"] for variant in variants] == [[{"url": url, "scale": 0.5}]]
    assert np.array_equal(pixels(legacy(server, {}, {})), pixels(plain))  # the served model is untouched


def test_an_image_by_url_with_is_url(server: Process, files: FileServer) -> None:
    by_url = legacy(server, {"init_image": f"{files.url}/red.png", "strength": 0.6}, {"is_url": True})
    red = base64.b64encode(files.files["/red.png"]).decode()
    by_value = legacy(server, {"init_image": red, "strength": 0.6}, {})
    assert by_url["$meta"]["PIPELINE"] == "StableDiffusionImg2ImgPipeline"
    assert np.array_equal(pixels(by_url), pixels(by_value))
    response = httpx.post(
        f"{server.url}/",
        json={"modelInputs": {"prompt": "x", "init_image": f"{files.url}/missing.png"}, "callInputs": {"is_url": True}},
        timeout=60,
    )
    assert response.status_code == 422
    assert "answered HTTP 404" in response.json()["$error"]["message"]


def test_outpainting_an_image_by_url_with_patchmatch_into_jxl(server: Process, files: FileServer) -> None:
    """The original's outpainting (callInputs.FILL_MODE) on an image by URL, answered as JPEG XL."""
    import pillow_jxl  # noqa: F401  (registers JXL with Pillow)

    body = legacy(
        server,
        {"init_image": f"{files.url}/half.png", "width": 32, "height": 32, "num_inference_steps": 2},
        {"is_url": True, "FILL_MODE": "patchmatch", "image_format": "JXL"},
    )
    assert (body["$meta"]["PIPELINE"], body["$meta"]["FILL_MODE"]) == ("StableDiffusionInpaintPipeline", "patchmatch")
    assert {"download", "fill", "inference", "encode"} <= body["$timings"].keys()
    with Image.open(io.BytesIO(base64.b64decode(body["image_base64"]))) as image:
        assert (image.format, image.size) == ("JXL", (32, 32))
