"""`diffusers-api runpod` through the runpod SDK's own local modes, in subprocesses: `--test_input` (one job,
then exit) and the local API server (`--rp_serve_api`: /run, /runsync, /status/{id}), plus the client's
`--runpod` mode pointed at that server.

Progress is observed where RunPod would see it: in local mode the SDK posts `progress_update` to
RUNPOD_WEBHOOK_POST_OUTPUT, which these tests point at a local receiver.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from support.envelopes import grass
from support.fakes import png_bytes
from support.processes import Process, cli, free_port, offline_env, running
from support.receiver import Post, Receiver, receiver

pytestmark = pytest.mark.e2e

STEPS = 8
GRASS = grass(STEPS, callback_steps=3)
BAD = {"modelInputs": {"prompt": "x", "width": 65}, "callInputs": {}}


def runpod_env(models_dir: Path, hook: Receiver) -> dict[str, str]:
    return offline_env(models_dir, RUNPOD_WEBHOOK_POST_OUTPUT=f"{hook.url}?id=$ID")


def progress_posts(posts: list[Post]) -> list[dict]:
    """What RunPod would have received from progress_update: `{"status": "IN_PROGRESS", "output": ...}`."""
    bodies = [json.loads(post.body) for post in posts]
    return [body["output"] for body in bodies if body.get("status") == "IN_PROGRESS"]


def png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return image.size


def run_test_input(models_dir: Path, hook: Receiver, job: dict) -> subprocess.CompletedProcess[str]:
    command = cli("runpod", "--model", "builtin/tiny-sd", "--test_input", json.dumps({"input": job}))
    env = runpod_env(models_dir, hook)
    del env["RUNPOD_LOG_LEVEL"]  # as a user runs it: the SDK's log follows --log-level (info)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_test_input_runs_a_legacy_job_with_progress(models_dir: Path) -> None:
    with receiver() as hook:
        done = run_test_input(models_dir, hook, GRASS)
        posts = hook.wait_for(lambda posts: len(progress_posts(posts)) >= 3, timeout=10)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "completed successfully" in log
    # The SDK's logger cuts long lines in the middle, so the image is checked by its PNG signature here and
    # decoded whole in the API-server test below.
    assert "Job result: {'output': {'image_base64': 'iVBORw0KGgo" in log  # base64 of b"\x89PNG\r\n\x1a\n"
    assert log.count("iVBORw0KGgo") == 1  # the SDK's default (DEBUG) logs the output three times
    assert "'PIPELINE': 'StableDiffusionPipeline'" in log
    updates = progress_posts(posts)
    assert [(update["stage"], update["step"], update["steps"]) for update in updates] == [
        ("inference", 3, STEPS),
        ("inference", 6, STEPS),
        ("inference", STEPS, STEPS),
    ]
    assert all(post.path == "/hook?id=local_test&isStream=false" for post in posts)


# --- the SDK's local API server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hook() -> Iterator[Receiver]:
    with receiver() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def api(models_dir: Path, hook: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    port = free_port()
    command = cli(
        "runpod",
        "--model",
        "builtin/tiny-sd",
        "--rp_serve_api",
        "--rp_api_host",
        "127.0.0.1",
        "--rp_api_port",
        str(port),
    )
    log = tmp_path_factory.mktemp("runpod") / "worker.log"

    def ready(url: str) -> bool:  # the SDK serves its docs at / once uvicorn is up, after the model loaded
        return httpx.get(url, timeout=5).status_code == 200

    with running(command, runpod_env(models_dir, hook), f"http://127.0.0.1:{port}", log, ready) as process:
        yield process


def test_api_server_completes_a_legacy_job(api: Process, hook: Receiver) -> None:
    before = len(hook.posts)
    response = httpx.post(f"{api.url}/runsync", json={"input": GRASS}, timeout=180)
    body = response.json()
    assert body["status"] == "COMPLETED", body
    assert png_size(body["output"]["image_base64"]) == (64, 64)
    assert body["output"]["$timings"]["inference"] > 0
    updates = progress_posts(hook.wait_for(lambda posts: len(progress_posts(posts[before:])) >= 3)[before:])
    assert [update["step"] for update in updates] == [3, 6, STEPS]


def test_api_server_runs_a_native_job_with_an_image_prompt(api: Process) -> None:
    red = base64.b64encode(png_bytes((200, 30, 30), 32)).decode()
    job = {
        "prompt": "a red barn",
        "num_inference_steps": 3,
        "ip_adapter": {"model": "builtin/tiny-ip-adapter", "image": red},
    }
    body = httpx.post(f"{api.url}/runsync", json={"input": job}, timeout=180).json()
    assert body["status"] == "COMPLETED", body
    assert body["output"]["meta"]["IP_ADAPTER"] == {"model": "builtin/tiny-ip-adapter", "scale": 1.0}
    assert png_size(body["output"]["images"][0]["data"]) == (64, 64)


def test_api_server_fails_a_bad_job_with_a_string_error(api: Process) -> None:
    body = httpx.post(f"{api.url}/runsync", json={"input": BAD}, timeout=180).json()
    assert body["status"] == "FAILED", body
    assert isinstance(body["error"], str)
    assert body["error"].startswith("INVALID_INPUTS: width: Input should be a multiple of 8")


def test_api_server_completes_a_controlnet_job(api: Process) -> None:
    condition = Image.new("RGB", (32, 32), (0, 0, 0))
    condition.paste((255, 255, 255), (8, 8, 24, 24))
    buffer = io.BytesIO()
    condition.save(buffer, format="PNG")
    entry = {"model": "builtin/tiny-controlnet", "image": base64.b64encode(buffer.getvalue()).decode()}
    job = {"prompt": "a red barn", "num_inference_steps": 2, "width": 32, "height": 32, "controlnet": entry}
    body = httpx.post(f"{api.url}/runsync", json={"input": job}, timeout=180).json()
    assert body["status"] == "COMPLETED", body
    assert body["output"]["meta"]["PIPELINE"] == "StableDiffusionControlNetPipeline"
    assert png_size(body["output"]["images"][0]["data"]) == (32, 32)


def test_api_server_outpaints_a_native_job(api: Process) -> None:
    """A native request with fill_mode: the transparent half is pre-filled and inpainted; the answer in JPEG XL."""
    import pillow_jxl  # noqa: F401  (registers JXL with Pillow)

    half = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    half.paste((30, 160, 60, 255), (0, 0, 16, 32))
    buffer = io.BytesIO()
    half.save(buffer, "PNG")
    job = {
        "prompt": "a meadow",
        "image": base64.b64encode(buffer.getvalue()).decode(),
        "fill_mode": "edge",
        "image_format": "jxl",
        "num_inference_steps": 2,
        "width": 32,
        "height": 32,
    }
    body = httpx.post(f"{api.url}/runsync", json={"input": job}, timeout=180).json()
    assert body["status"] == "COMPLETED", body
    output = body["output"]
    assert (output["meta"]["FILL_MODE"], output["images"][0]["format"]) == ("edge", "jxl")
    with Image.open(io.BytesIO(base64.b64decode(output["images"][0]["data"]))) as image:
        assert (image.format, image.size) == ("JXL", (32, 32))


def test_api_server_upscales_with_the_legacy_use_extra(api: Process) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 6), (200, 40, 90)).save(buffer, "PNG")
    job = {
        "modelInputs": {"input_image": base64.b64encode(buffer.getvalue()).decode()},
        "callInputs": {"MODEL_ID": "builtin/tiny-upscaler", "use_extra": "upsample"},
    }
    body = httpx.post(f"{api.url}/runsync", json={"input": job}, timeout=120).json()
    assert body["status"] == "COMPLETED", body
    assert png_size(body["output"]["image_base64"]) == (40, 24)
    assert body["output"]["$meta"]["PIPELINE"] == "upscale"


def client(api: Process, *args: str) -> subprocess.CompletedProcess[str]:
    command = cli("client", "--runpod", "--endpoint", api.url, *args)  # the SDK's local API is the endpoint
    return subprocess.run(command, env=offline_env(Path("unused")), capture_output=True, text=True, timeout=240)


def test_client_runpod_mode_completes_a_job_and_saves_the_image(api: Process, tmp_path: Path) -> None:
    size = ["--model-arg", "width=64", "--model-arg", "height=64", "--model-arg", "num_inference_steps=2"]
    done = client(
        api, "txt2img", "img2img", *size, "--call-arg", "MODEL_ID=builtin/tiny-sd", "--output-dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with Image.open(tmp_path / "txt2img.png") as image:
        assert image.size == (64, 64)
    assert (tmp_path / "img2img.png").exists()
    assert "request took" in done.stdout
    assert '"inference":' in done.stdout


def test_client_runpod_mode_stops_on_failed_with_the_reason(api: Process, tmp_path: Path) -> None:
    done = client(api, "txt2img", "--model-arg", "width=65", "--output-dir", str(tmp_path))
    assert done.returncode == 1
    assert "ended FAILED: INVALID_INPUTS: width: Input should be a multiple of 8" in done.stderr
    assert not tmp_path.joinpath("txt2img.png").exists()


def test_api_server_runs_long_weighted_prompts_and_refuses_bad_syntax(api: Process) -> None:
    long = "realistic field of (grass)1.4 under a blue sky, " * 8  # about 100 tokens, in compel's syntax
    call_inputs = {"PIPELINE": "lpw_stable_diffusion", "custom_pipeline_method": "text2img", "compel_prompts": True}
    body = httpx.post(f"{api.url}/runsync", json={"input": grass(2, call_inputs, prompt=long)}, timeout=180).json()
    assert body["status"] == "COMPLETED", body
    assert png_size(body["output"]["image_base64"]) == (64, 64)
    assert body["output"]["$meta"]["PIPELINE"] == "StableDiffusionPipeline"
    bad = grass(2, {"compel_prompts": True}, prompt="a (red barn")
    body = httpx.post(f"{api.url}/runsync", json={"input": bad}, timeout=180).json()
    assert body["status"] == "FAILED", body
    assert body["error"] == "INVALID_INPUTS: prompt: '(' at character 3 is never closed (in compel syntax)"
