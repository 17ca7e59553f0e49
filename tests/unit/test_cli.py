"""The command line's parsing and reports, in process (`cli.main`), plus one fresh interpreter for a missing
runpod SDK: which flags each command takes, whose usage a mistake prints, what `download` says it did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_api.cli import build_parser, main, settings_from_args, what_download_did
from diffusers_api.runpod_worker import unknown_sdk_flags

MODEL_SOURCE_FLAGS = [
    "--hf-model-id",
    "acme/sd",
    "--model-url",
    "s3://bucket/",
    "--checkpoint-url",
    "https://example.com/model.safetensors",
    "--checkpoint-config-url",
    "https://example.com/v1-inference.yaml",
]


@pytest.mark.parametrize("command", ["serve", "download", "runpod"])
def test_every_model_command_takes_the_model_source_flags(command: str) -> None:
    args = build_parser().parse_args([command, "--model", "alias", *MODEL_SOURCE_FLAGS])
    settings = settings_from_args(args)
    assert (settings.hf_model_id, settings.model_url, settings.checkpoint_url, settings.checkpoint_config_url) == (
        "acme/sd",
        "s3://bucket/",
        "https://example.com/model.safetensors",
        "https://example.com/v1-inference.yaml",
    )


@pytest.mark.parametrize(
    ("argv", "unknown"),
    [
        (["serve", "--modle", "x"], "--modle x"),
        (["download", "--model", "x", "--prceision", "fp16"], "--prceision fp16"),
        (["client", "txt2img", "--runpod", "--endpiont=e"], "--endpiont=e"),
    ],
    ids=["serve", "download", "client"],
)
def test_a_mistyped_flag_prints_its_commands_usage(
    argv: list[str], unknown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: diffusers-api {argv[0]} [-h]" in err
    assert f"diffusers-api {argv[0]}: error: unrecognized arguments: {unknown}" in err


def test_a_mistyped_top_level_flag_prints_the_top_level_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--verison"])
    assert "diffusers-api: error: unrecognized arguments: --verison" in capsys.readouterr().err


# --- runpod: the SDK's flags pass, any other is refused -----------------------------------------------------------


@pytest.fixture
def sdk_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the SDK sets RUNPOD_LOG_LEVEL when unset; this puts the variable back as it was afterwards."""
    monkeypatch.setenv("RUNPOD_LOG_LEVEL", "INFO")


@pytest.mark.usefixtures("sdk_log_level")
def test_the_sdks_own_flags_are_known() -> None:
    sdk = ["--test_input", '{"input": {}}', "--rp_serve_api", "--rp_api_host", "0.0.0.0", "--rp_api_port", "8001"]
    assert unknown_sdk_flags([*sdk, "--rp_log_level", "DEBUG"], "info") == []
    assert unknown_sdk_flags(["--rp_serve_api", "--rp-api-port", "8001"], "info") == ["--rp-api-port", "8001"]


@pytest.mark.usefixtures("sdk_log_level")
def test_runpod_refuses_a_flag_that_is_neither_ours_nor_the_sdks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["runpod", "--model", "builtin/tiny-sd", "--test-input", "{}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: diffusers-api runpod [-h]" in err
    assert "unrecognized arguments (neither ours nor the runpod SDK's): --test-input {}" in err


HIDE_RUNPOD = """
import importlib.abc, sys

class NoRunpod(importlib.abc.MetaPathFinder):  # as if the runpod extra were not installed
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "runpod":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoRunpod())
from diffusers_api.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("extra", [[], ["--rp_serve_api"]], ids=["plain", "with-sdk-flags"])
def test_runpod_without_the_extra_names_the_install_command(extra: list[str], tmp_path: Path) -> None:
    command = [sys.executable, "-c", HIDE_RUNPOD, "runpod", "--model", "builtin/tiny-sd", "--models-dir", str(tmp_path)]
    done = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install 'diffusers-api[runpod]'" in done.stderr
    assert "Traceback" not in done.stderr


# --- download's report ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timings", "on_disk", "said"),
    [
        ({}, True, "already on disk, nothing to download"),
        ({}, False, "generated here (a built-in model), nothing to download"),
        ({"download": 1234.0}, False, "downloaded in 1.2 s"),
        (
            {"download": 500.0, "upload": 2500.0},
            False,
            "added to the cloud cache (MODEL_URL): fetched from its source, packed and uploaded in 3.0 s",
        ),
    ],
    ids=["on-disk", "generated", "downloaded", "built-and-uploaded"],
)
def test_download_says_what_it_did(timings: dict[str, float], on_disk: bool, said: str) -> None:
    assert what_download_did(timings, on_disk) == said
