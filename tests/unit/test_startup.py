"""What a server process does before it can answer: `diffusers-api serve` parses its flags, configures logging,
builds the app and listens without importing torch, diffusers or transformers. Those take seconds to import and
load with the model, on the engine's thread, while /health says STARTING (and /ping 204).

Each check runs in a fresh interpreter: this test process has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# The ML stack, and what serving needs only once it is used: the RunPod SDK, the S3 client (the cloud cache), the
# metrics library (the first scrape), PEFT (the first LoRA), the download client (the first fetch), Ray (only
# `serve run diffusers_api.ray:app` imports it), compel (the first weighted or long prompt), spandrel and einops (the
# first upscale), patchmatch (the first outpainting pre-fill), pillow_jxl (the first JXL image).
HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "runpod",
    "boto3",
    "botocore",
    "prometheus_client",
    "peft",
    "httpx",
    "numpy",
    "scipy",
    "ray",
    "compel",
    "spandrel",
    "einops",
    "patchmatch",
    "pillow_jxl",
)

REPORT = f"""
import json, os, sys
print(json.dumps({{
    "imported": sorted(m for m in {HEAVY!r} if m in sys.modules),
    "env": {{k: os.environ.get(k) for k in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}},
}}))
"""


def run_fresh(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": "/usr/bin:/bin",
        "MODELS_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": ":".join(sys.path),
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, timeout=120, check=False
    )


def report(code: str, tmp_path: Path, **env: str) -> dict:
    done = run_fresh(code + REPORT, tmp_path, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict = json.loads(done.stdout.splitlines()[-1])
    return result


SERVE_UNTIL_LISTENING = """
from diffusers_api.cli import build_parser, settings_from_args
from diffusers_api.http.app import create_app
from diffusers_api.logs import configure_logging

settings = settings_from_args(build_parser().parse_args(["serve", "--model", "builtin/tiny-sd"]))
configure_logging(settings.log_level)
app = create_app(settings)  # the real engine, runner and model store; the model loads in the lifespan
import uvicorn
"""


def test_serve_builds_its_app_without_importing_ml_libraries(tmp_path: Path) -> None:
    assert report(SERVE_UNTIL_LISTENING, tmp_path)["imported"] == []


@pytest.mark.parametrize("command", ["serve", "runpod", "download"])
def test_each_command_help_answers_without_ml_libraries(command: str, tmp_path: Path) -> None:
    done = run_fresh(
        f"import sys\nfrom diffusers_api.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
        f"except SystemExit:\n    pass\n{REPORT}",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"usage: diffusers-api {command}" in done.stdout
    assert json.loads(done.stdout.splitlines()[-1])["imported"] == []


def test_logging_turns_library_progress_bars_off_in_logs(tmp_path: Path) -> None:
    """stderr is a pipe here, as in a container: diffusers' and transformers' bars would litter the log."""
    code = (
        "from diffusers_api.logs import configure_logging\nconfigure_logging()\n"
        "from diffusers.utils import logging\nfor _ in logging.tqdm(range(3), desc='bar-from-diffusers'):\n"
        "    pass\n"
    )
    done = run_fresh(code + REPORT, tmp_path, TRANSFORMERS_VERBOSITY="error")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bar-from-diffusers" not in done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["env"] == {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_logging_keeps_an_explicit_progress_bar_choice(tmp_path: Path) -> None:
    code = "from diffusers_api.logs import configure_logging\nconfigure_logging()\n"
    env = report(code, tmp_path, TQDM_DISABLE="0", HF_HUB_DISABLE_PROGRESS_BARS="0")["env"]
    assert env == {"TQDM_DISABLE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "0"}


def test_access_logs_never_show_an_events_token() -> None:
    import logging

    from diffusers_api.logs import RedactTokens

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/jobs/ab/events?token=deadbeef&x=1", "1.1", 200),
        None,
    )
    assert RedactTokens().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /v1/jobs/ab/events?token=<redacted>&x=1 HTTP/1.1" 200'
