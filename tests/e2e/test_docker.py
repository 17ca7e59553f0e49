"""The Docker image's pieces, run here without a Docker engine: the entrypoint in both modes with the real CLI,
the model-baking step with a recording stand-in for `diffusers-api`, and the Dockerfile's own consistency
(build args, secrets only as BuildKit mounts, every copied or executed file present and not docker-ignored)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from support.processes import free_port, offline_env, running

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BAKE = ROOT / "docker" / "bake-model.sh"
BUILD_ARGS = (
    "MODEL_ID",
    "HF_MODEL_ID",
    "MODEL_REVISION",
    "MODEL_VARIANT",
    "MODEL_PRECISION",
    "MODEL_URL",
    "CHECKPOINT_URL",
)


def with_venv_on_path(env: dict[str, str]) -> dict[str, str]:
    """The image puts its venv first on PATH; here the test's interpreter's bin directory stands for it."""
    return env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


def recording_cli(tmp_path: Path) -> Path:
    """A stand-in `diffusers-api` that writes its arguments and environment to a file, for checking what the
    scripts would run without running it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record.json"
    fake = bin_dir / "diffusers-api"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    return bin_dir


def run_script(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=240)


def recorded(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "record.json").read_text())


# --- the entrypoint ---------------------------------------------------------------------------------------------


def test_entrypoint_runpod_mode_runs_the_worker(models_dir: Path) -> None:
    """A bad job, so that this also shows the SDK's --test_input run failing (exit 1) with our string error;
    tests/e2e/test_runpod.py runs a good one."""
    job = {"input": {"modelInputs": {"prompt": "grass", "height": 65}, "callInputs": {}}}
    env = with_venv_on_path(offline_env(models_dir, MODE="runpod", MODEL_ID="builtin/tiny-sd"))
    done = run_script(ENTRYPOINT, env, "--test_input", json.dumps(job))
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "Job local_test failed with error: INVALID_INPUTS: height: Input should be a multiple of 8" in log


def test_entrypoint_http_mode_serves(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = with_venv_on_path(offline_env(models_dir, MODE="http", MODEL_ID="builtin/tiny-sd", PORT=str(port)))

    def answers(url: str) -> bool:  # 204 while the model loads is enough: the HTTP server is what MODE=http runs
        return httpx.get(f"{url}/ping", timeout=5).status_code in (200, 204)

    command = [str(ENTRYPOINT), "--host", "127.0.0.1"]
    with running(command, env, f"http://127.0.0.1:{port}", tmp_path / "log", answers) as server:
        assert httpx.get(f"{server.url}/health").json()["status"] in ("STARTING", "READY")


@pytest.mark.parametrize(
    ("extra_env", "command"),
    [({}, "serve"), ({"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID"}, "runpod")],
    ids=["no-runpod-queue-means-http", "runpod-queue-means-worker"],
)
def test_entrypoint_auto_mode_picks_by_environment(tmp_path: Path, extra_env: dict[str, str], command: str) -> None:
    env = {"PATH": f"{recording_cli(tmp_path)}{os.pathsep}{os.environ['PATH']}", "MODE": "auto", **extra_env}
    done = run_script(ENTRYPOINT, env, "--port", "9000")
    assert done.returncode == 0, done.stderr
    assert recorded(tmp_path)["argv"] == [command, "--port", "9000"]


def test_entrypoint_refuses_an_unknown_mode() -> None:
    done = run_script(ENTRYPOINT, {"PATH": os.environ["PATH"], "MODE": "grpc"})
    assert done.returncode == 64
    assert "MODE must be runpod, http or auto, not 'grpc'" in done.stderr


# --- baking the model -------------------------------------------------------------------------------------------


def test_bake_runs_download_with_the_build_args_and_the_mounted_secrets(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "hf_token").write_text("hf_secret_value")
    build_args = {name: f"value-of-{name}" for name in BUILD_ARGS}
    env = {
        "PATH": f"{recording_cli(tmp_path)}{os.pathsep}{os.environ['PATH']}",
        "SECRETS_DIR": str(secrets),
        **build_args,
    }
    done = run_script(BAKE, env)
    assert done.returncode == 0, done.stderr
    seen = recorded(tmp_path)
    assert seen["argv"] == ["download"]
    assert seen["env"]["HF_TOKEN"] == "hf_secret_value"
    assert "AWS_ACCESS_KEY_ID" not in seen["env"]  # not mounted, not set
    for name, value in build_args.items():
        assert seen["env"][name] == value


def test_bake_without_a_model_builds_a_bare_image(tmp_path: Path) -> None:
    env = {"PATH": f"{recording_cli(tmp_path)}{os.pathsep}{os.environ['PATH']}", "SECRETS_DIR": str(tmp_path)}
    done = run_script(BAKE, env)
    assert done.returncode == 0
    assert "without a baked-in model" in done.stderr
    assert not (tmp_path / "record.json").exists()


# --- the Dockerfile ---------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerignored(path: str) -> bool:
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_dockerfile_declares_the_build_args_and_passes_them_to_the_environment() -> None:
    instructions = dockerfile_instructions()
    args = {value.split("=")[0] for kind, value in instructions if kind == "ARG"}
    env = " ".join(value for kind, value in instructions if kind == "ENV")
    for name in BUILD_ARGS:
        assert name in args
        assert f"{name}=${{{name}}}" in env


def test_dockerfile_never_puts_a_secret_in_an_arg_or_env() -> None:
    for kind, value in dockerfile_instructions():
        if kind in ("ARG", "ENV"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY|SIGN_KEY", value), value
    bake = next(value for kind, value in dockerfile_instructions() if kind == "RUN" and "bake-model.sh" in value)
    for secret in ("hf_token", "aws_access_key_id", "aws_secret_access_key"):
        assert f"--mount=type=secret,id={secret}" in bake


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    copied = [value.split()[:-1] for kind, value in dockerfile_instructions() if kind == "COPY"]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not dockerignored(source), source
    entrypoint = next(value for kind, value in dockerfile_instructions() if kind == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/app/docker/entrypoint.sh"]
    assert os.access(ENTRYPOINT, os.X_OK)
    assert os.access(BAKE, os.X_OK)
