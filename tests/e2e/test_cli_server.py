"""The real CLI in a subprocess, over real HTTP: what a user does after `make install serve`."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from support.envelopes import GRASS, grass
from support.fakes import png_bytes
from support.processes import cli, free_port, offline_env, running, serving

pytestmark = pytest.mark.e2e

API_KEY = "e2e-secret"
AUTH = {"authorization": f"Bearer {API_KEY}"}


# A 64x64 green square, the init image of img2img requests.
GRASS_IMAGE = base64.b64encode(png_bytes((40, 160, 40), 64)).decode()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    startup_statuses: list[int]  # what /ping answered while the model loaded


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    statuses: list[int] = []

    def ready(url: str) -> bool:
        statuses.append(httpx.get(f"{url}/ping", timeout=5).status_code)
        return statuses[-1] == 200

    log = tmp_path_factory.mktemp("server") / "server.log"
    command = cli("serve", "--model", "builtin/tiny-sd", "--host", "127.0.0.1", "--port", str(port))
    env = offline_env(models_dir, API_KEY=API_KEY)
    with running(command, env, f"http://127.0.0.1:{port}", log, ready, timeout=180) as handle:
        yield Server(handle.url, handle.process, statuses)


def test_help_answers_fast() -> None:
    started = time.perf_counter()
    done = subprocess.run(cli("--help"), capture_output=True, text=True, check=True)
    assert time.perf_counter() - started < 1.5  # < 1 s on an idle machine; slack for a loaded CI box
    assert "serve" in done.stdout


def test_serve_without_a_model_says_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_ID"}
    done = subprocess.run(cli("serve"), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert "--model" in done.stderr


def test_bad_flag_value_is_a_clear_error() -> None:
    done = subprocess.run(cli("serve", "--model", "x", "--precision", "fp8"), capture_output=True, text=True)
    assert done.returncode != 0
    assert "model_precision" in done.stderr


def test_probes_answer_starting_then_ready(server: Server) -> None:
    assert set(server.startup_statuses) <= {204, 200}
    assert server.startup_statuses[-1] == 200
    assert httpx.get(f"{server.url}/health").json()["status"] == "READY"
    assert httpx.get(f"{server.url}/healthcheck").json() == {"state": "healthy", "gpu": False}


def test_legacy_grass_request(server: Server) -> None:
    response = httpx.post(f"{server.url}/", json=GRASS, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(body["image_base64"])))
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert body["$timings"]["inference"] > 0
    assert body["$meta"]["MODEL_ID"] == "builtin/tiny-sd"
    assert body["$meta"]["PIPELINE"] == "StableDiffusionPipeline"
    assert body["$meta"]["SCHEDULER"] == "DPMSolverMultistepScheduler"
    assert isinstance(body["$meta"]["seed"], int)


def test_native_png_bytes_and_determinism(server: Server) -> None:
    request = {"prompt": "a red barn", "num_inference_steps": 4, "seed": 21}
    headers = AUTH | {"accept": "image/png"}
    first = httpx.post(f"{server.url}/v1/generate", json=request, headers=headers, timeout=120)
    second = httpx.post(f"{server.url}/v1/generate", json=request, headers=headers, timeout=120)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png"
    assert first.headers["x-seed"] == "21"
    assert first.content == second.content


def test_weighted_and_long_prompts_in_legacy_envelopes(server: Server) -> None:
    """compel_prompts, and the original's lpw_stable_diffusion community pipeline in img2img mode: both run on
    the model's own pipelines, in the batched loop."""
    weighted = grass(2, {"compel_prompts": True}, prompt="realistic field of (grass)1.6", seed=5)
    long = "realistic field of grass under a blue sky, " * 10 + "(at dusk:1.3)"  # about 100 tokens
    lpw = {
        "modelInputs": {"prompt": long, "image": GRASS_IMAGE, "strength": 0.9, "num_inference_steps": 2, "seed": 5},
        "callInputs": {"PIPELINE": "lpw_stable_diffusion", "custom_pipeline_method": "img2img"},
    }
    plain = grass(2, prompt="realistic field of (grass)1.6", seed=5)
    bodies = []
    for envelope in (weighted, lpw, plain):
        response = httpx.post(f"{server.url}/", json=envelope, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        bodies.append(response.json())
    assert [body["$meta"]["PIPELINE"] for body in bodies] == [
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionPipeline",
    ]
    assert {body["$meta"]["LOOP"] for body in bodies} == {"batched"}
    assert bodies[0]["image_base64"] != bodies[2]["image_base64"]  # the weight was read, not the brackets


def small_png(width: int = 16, height: int = 12) -> str:
    rows = (np.arange(height * width * 3).reshape(height, width, 3) * 5 % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rows, "RGB").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_upscale_native_and_legacy(server: Server) -> None:
    """POST /v1/upscale (JSON and image bytes) and the legacy `use_extra: "upsample"`: the same 4x image."""
    request = {"image": small_png(), "model": "builtin/tiny-upscaler"}
    native = httpx.post(f"{server.url}/v1/upscale", json=request, headers=AUTH, timeout=60)
    assert native.status_code == 200, native.text
    body = native.json()
    assert {key: body["images"][0][key] for key in ("format", "width", "height")} == {
        "format": "png",
        "width": 64,
        "height": 48,
    }
    assert body["meta"]["PIPELINE"] == "upscale"
    assert {"decode", "inference", "encode"} <= set(body["timings"])
    raw = httpx.post(f"{server.url}/v1/upscale", json=request, headers=AUTH | {"accept": "image/png"}, timeout=60)
    assert raw.headers["content-type"] == "image/png"
    assert raw.content == base64.b64decode(body["images"][0]["data"])
    envelope = {
        "modelInputs": {"input_image": request["image"], "face_enhance": False},
        "callInputs": {"MODEL_ID": "builtin/tiny-upscaler", "use_extra": "upsample"},
    }
    legacy = httpx.post(f"{server.url}/", json=envelope, headers=AUTH, timeout=60).json()
    assert legacy["image_base64"] == body["images"][0]["data"]
    assert legacy["$timings"]["inference"] > 0
    assert legacy["$meta"]["output_size"] == [64, 48]


@pytest.mark.parametrize(
    ("request_body", "words"),
    [
        ({"image": "not base64!"}, "image: not valid base64"),
        ({"image": small_png(), "model": "nope"}, "available: RealESRGAN_x4plus"),
        ({"image": small_png(), "face_enhance": True}, "face_enhance: face restoration (GFPGAN)"),
    ],
    ids=["bad-base64", "unknown-upscaler", "face-enhance"],
)
def test_upscale_bad_inputs_are_422(server: Server, request_body: dict, words: str) -> None:
    request_body.setdefault("model", "builtin/tiny-upscaler")
    response = httpx.post(f"{server.url}/v1/upscale", json=request_body, headers=AUTH, timeout=60)
    assert response.status_code == 422
    assert words in response.json()["error"]["message"]


def test_concurrent_requests_with_different_schedulers(server: Server) -> None:
    def ask(scheduler: str) -> bytes:
        envelope = {
            "modelInputs": {"prompt": "a red barn", "num_inference_steps": 4, "seed": 8},
            "callInputs": {"SCHEDULER": scheduler},
        }
        response = httpx.post(f"{server.url}/", json=envelope, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        return base64.b64decode(response.json()["image_base64"])

    names = ["Euler a", "DDIM", "DPM++ 2M"]
    alone = [ask(name) for name in names]
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(ask, names))
    # Batched with each other, their UNet ran at a larger batch: kernels may round the last bits differently,
    # which shows as at most one 8-bit level on a few pixels. Anything leaking between them would be far more.
    for batched, solo in zip(together, alone, strict=True):
        difference = np.abs(pixels(batched) - pixels(solo))
        assert difference.max() <= 1
        assert (difference > 0).mean() <= 0.01
    assert len(set(alone)) == len(names)


def test_an_image_prompt_through_the_legacy_envelope(server: Server) -> None:
    """modelInputs carries the native `ip_adapter`; the builtin tiny adapter is generated offline on first use."""
    red = base64.b64encode(png_bytes((200, 30, 30), 32)).decode()
    ip_adapter = {"model": "builtin/tiny-ip-adapter", "image": red, "scale": 0.8}
    envelope = {"modelInputs": {"prompt": "a red barn", "num_inference_steps": 3, "ip_adapter": ip_adapter}}
    response = httpx.post(f"{server.url}/", json=envelope | {"callInputs": {}}, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["$meta"]["IP_ADAPTER"] == {"model": "builtin/tiny-ip-adapter", "scale": 0.8}
    refused = httpx.post(
        f"{server.url}/v1/generate", json={"prompt": "x", "ip_adapter": ip_adapter | {"scale": 3}}, headers=AUTH
    )
    assert refused.status_code == 422
    assert "ip_adapter.scale" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("envelope", "status", "code"),
    [
        ({"modelInputs": {}}, 422, "INVALID_INPUTS"),
        ({"modelInputs": {"prompt": "x"}, "callInputs": {"PIPELINE": "Nope"}}, 404, "NO_SUCH_PIPELINE"),
        ({"modelInputs": {"prompt": "x"}, "callInputs": {"SCHEDULER": "Nope"}}, 422, "INVALID_SCHEDULER"),
        (
            {"modelInputs": {"prompt": "x", "image": "bm90IGFuIGltYWdl"}, "callInputs": {}},
            422,
            "INVALID_INPUTS",
        ),
        ({"modelInputs": {"prompt": "x"}, "callInputs": {"MODEL_ID": "other/model"}}, 404, "MODEL_MISMATCH"),
        ({"modelInputs": {"prompt": "a (red"}, "callInputs": {"compel_prompts": True}}, 422, "INVALID_INPUTS"),
    ],
    ids=["missing-key", "unknown-pipeline", "unknown-scheduler", "not-an-image", "other-model", "prompt-syntax"],
)
def test_bad_inputs_get_clear_errors_and_the_server_stays_up(
    server: Server, envelope: dict, status: int, code: str
) -> None:
    response = httpx.post(f"{server.url}/", json=envelope, headers=AUTH, timeout=60)
    assert response.status_code == status
    assert response.json()["$error"]["code"] == code
    assert "Traceback" not in response.text
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_wrong_api_key(server: Server) -> None:
    response = httpx.post(f"{server.url}/", json=GRASS, headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert response.json()["$error"]["code"] == "UNAUTHORIZED"


def test_metrics_need_the_key_and_count_requests(server: Server) -> None:
    assert httpx.post(f"{server.url}/", json=grass(steps=2), headers=AUTH, timeout=120).status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    response = httpx.get(f"{server.url}/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    done = [line for line in response.text.splitlines() if line.startswith("diffusers_api_requests_total")]
    assert any('status="done"' in line and float(line.split()[-1]) >= 1 for line in done), done
    assert "diffusers_api_unet_forward_rows_bucket" in response.text


def test_shutdown_on_sigterm(models_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with serving(models_dir, log) as handle:
        pass  # leaving sends SIGTERM, and SIGKILL only after 30 s without an exit
    # uvicorn shuts down gracefully, then re-raises the signal so that supervisors see it
    assert handle.process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in log.read_text()
