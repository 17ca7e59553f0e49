"""ControlNets and T2I-Adapters through the real server over HTTP (one server start): the native field, the
original's CONTROLNET_MODEL_ID, a conditioning image by URL, and a control model the server may not fetch."""

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
from support.processes import Process, serving
from support.servers import FileServer, file_server

pytestmark = pytest.mark.e2e


def condition() -> Image.Image:
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((255, 255, 255), (8, 8, 24, 24))
    return image


CONDITION = base64.b64encode(encode_image(condition())).decode()
BASE = {"prompt": "a red barn", "num_inference_steps": 2, "seed": 5, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    with file_server() as server:
        server.files["/edges.png"] = encode_image(condition())
        yield server


@pytest.fixture(scope="module")
def server(models_dir: Path, files: FileServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    env = {"ALLOW_PRIVATE_URLS": "1"}  # the file server listens on loopback
    with serving(models_dir, tmp_path_factory.mktemp("controlnet") / "server.log", env) as process:
        yield process


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))).astype(int)


def native(server: Process, **fields: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generate", json=BASE | fields, timeout=120)


def test_native_and_legacy_give_the_same_controlled_image(server: Process, files: FileServer) -> None:
    entry = {"model": "builtin/tiny-controlnet", "image": CONDITION, "scale": 0.9}
    controlled = native(server, controlnet=entry)
    assert controlled.status_code == 200, controlled.text
    body = controlled.json()
    assert body["meta"]["PIPELINE"] == "StableDiffusionControlNetPipeline"
    assert body["meta"]["CONTROLNET"] == [
        {"model": "builtin/tiny-controlnet", "scale": 0.9, "start": 0.0, "end": 1.0, "type": "controlnet"}
    ]
    image = pixels(body["images"][0]["data"])
    assert not np.array_equal(image, pixels(native(server).json()["images"][0]["data"]))

    by_url = native(server, controlnet=entry | {"image": f"{files.url}/edges.png"})
    assert by_url.status_code == 200, by_url.text
    assert np.array_equal(pixels(by_url.json()["images"][0]["data"]), image)

    envelope = {
        "modelInputs": BASE | {"image": CONDITION, "controlnet_conditioning_scale": 0.9},
        "callInputs": {
            "CONTROLNET_MODEL_ID": "builtin/tiny-controlnet",
            "PIPELINE": "StableDiffusionControlNetPipeline",
        },
    }
    legacy = httpx.post(f"{server.url}/", json=envelope, timeout=120)
    assert legacy.status_code == 200, legacy.text
    assert legacy.json()["$meta"]["PIPELINE"] == "StableDiffusionControlNetPipeline"
    assert np.array_equal(pixels(legacy.json()["image_base64"]), image)


def test_t2i_adapter_and_the_resident_controls(server: Process) -> None:
    response = native(server, controlnet={"model": "builtin/tiny-t2i-adapter", "image": CONDITION, "type": "t2i"})
    assert response.status_code == 200, response.text
    assert response.json()["meta"]["PIPELINE"] == "StableDiffusionAdapterPipeline"
    assert response.json()["timings"]["loadControl"] >= 0
    controls = httpx.get(f"{server.url}/v1/models", timeout=30).json()["controls"]
    assert (controls[0]["model"], controls[0]["type"]) == ("builtin/tiny-t2i-adapter", "t2i")  # most recent first
    assert all(c["bytes"] > 0 for c in controls)


def test_errors_are_4xx_naming_the_problem(server: Process) -> None:
    not_fetched = native(server, controlnet={"model": "acme/controlnet-canny", "image": CONDITION})
    assert not_fetched.status_code == 404
    error = not_fetched.json()["error"]
    assert error["code"] == "MODEL_MISMATCH"
    assert "RUNTIME_DOWNLOADS=0 forbids fetching it" in error["message"]
    bad = native(server, controlnet={"model": "builtin/tiny-controlnet", "image": CONDITION, "start": 0.5, "end": 0.2})
    assert bad.status_code == 422
    assert "start (0.5) must be less than end (0.2)" in bad.json()["error"]["message"]
