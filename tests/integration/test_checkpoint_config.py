"""CHECKPOINT_CONFIG_URL: a single-file checkpoint converted with the original repository's .yaml config, which
diffusers reads the UNet's and VAE's architecture from (`original_config`), fetched over HTTP like the checkpoint.

The checkpoint is the tiny SD model with a VAE that an original config can describe (its GroupNorms have 32 groups,
as the original code hard-codes), written in the original layout (support/ldm.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffusers_api.config import Settings
from diffusers_api.errors import InvalidInputs, ModelLoadError, ModelNotFound
from diffusers_api.models.builtin import ensure_builtin
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, from_legacy
from support.ldm import ldm_state_dict
from support.servers import FileServer, file_server

TINY = "builtin/tiny-sd"
VAE_CHANNELS = 32


def original_config(vae_channels: int = VAE_CHANNELS) -> bytes:
    """What v1-inference.yaml says, for the tiny model's sizes (JSON is YAML)."""
    unet = {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_heads": 8,
        "transformer_depth": 1,
        "context_dim": 32,
        "use_linear_in_transformer": False,
    }
    vae = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": vae_channels,
        "ch_mult": [1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    params = {
        "scale_factor": 0.18215,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"ddconfig": vae}},
    }
    return json.dumps({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}).encode()


@pytest.fixture(scope="module")
def checkpoint(models_dir: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The checkpoint's bytes, and its VAE's diffusers weights (what the conversion must give back)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from safetensors.torch import save

    pipe = StableDiffusionPipeline.from_pretrained(ensure_builtin(TINY, models_dir))
    torch.manual_seed(0)
    pipe.vae = AutoencoderKL(
        block_out_channels=[VAE_CHANNELS, VAE_CHANNELS],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    return save(ldm_state_dict(pipe)), pipe.vae.state_dict()


@pytest.fixture
def files(checkpoint: tuple[bytes, dict[str, torch.Tensor]]) -> Iterator[FileServer]:
    with file_server() as server:
        server.files["/tiny.safetensors"] = checkpoint[0]
        server.files["/v1-inference.yaml"] = original_config()
        server.files["/not-a-config.yaml"] = b"- just\n- a list\n"
        server.files["/wrong-sizes.yaml"] = original_config(vae_channels=64)
        yield server


def runner(models_dir: Path, tmp_path: Path) -> Runner:
    allowed = {"runtime_downloads": True, "allow_private_urls": True, "local_model_roots": [models_dir]}
    return Runner(Settings(models_dir=tmp_path, **allowed))


def ask(files: FileServer, config: str, models_dir: Path) -> GenerateRequest:
    return GenerateRequest(
        prompt="a lighthouse",
        num_inference_steps=2,
        width=32,
        height=32,
        seed=1,
        model="acme/tiny-yaml",
        checkpoint_url=f"{files.url}/tiny.safetensors",
        checkpoint_config_url=f"{files.url}{config}",
        hf_model_id=str(ensure_builtin(TINY, models_dir)),  # the text encoder, tokenizer and scheduler, offline
        safety_checker=False,
    )


def test_the_original_config_gives_the_architecture(
    files: FileServer, checkpoint: tuple[bytes, dict[str, torch.Tensor]], models_dir: Path, tmp_path: Path
) -> None:
    from diffusers import AutoencoderKL

    result = runner(models_dir, tmp_path).run(ask(files, "/v1-inference.yaml", models_dir))

    assert "download" in result.timings
    assert [path for path, _ in files.requests].count("/v1-inference.yaml") == 1
    converted = tmp_path / "models--acme--tiny-yaml"
    # the VAE is the checkpoint's (two blocks of 32 channels, from the .yaml), not the configuration's (16, 32, 32)
    vae = AutoencoderKL.from_pretrained(converted / "vae")
    assert list(vae.config.block_out_channels) == [VAE_CHANNELS, VAE_CHANNELS]
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in checkpoint[1].items())
    assert [p.name for p in tmp_path.iterdir()] == ["models--acme--tiny-yaml"]  # no temporary file left


@pytest.mark.parametrize(
    ("config", "error", "fragment"),
    [
        ("/not-a-config.yaml", InvalidInputs, "not an original Stable Diffusion config"),
        ("/missing.yaml", ModelNotFound, "no config at http"),
        ("/wrong-sizes.yaml", ModelLoadError, "could not convert checkpoint"),
    ],
    ids=["not-a-config", "missing", "wrong-architecture"],
)
def test_a_config_that_cannot_serve_is_a_clear_error(
    files: FileServer, models_dir: Path, tmp_path: Path, config: str, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        runner(models_dir, tmp_path).run(ask(files, config, models_dir))
    assert not (tmp_path / "models--acme--tiny-yaml").exists()


def test_legacy_key_and_local_paths_are_checked_like_the_checkpoints(models_dir: Path, tmp_path: Path) -> None:
    envelope = {
        "modelInputs": {"prompt": "x"},
        "callInputs": {
            "MODEL_ID": "acme/tiny-yaml",
            "CHECKPOINT_URL": str(models_dir / "tiny.safetensors"),
            "CHECKPOINT_CONFIG_URL": "/etc/passwd",
        },
    }
    request = from_legacy(envelope)
    assert request.checkpoint_config_url == "/etc/passwd"
    with pytest.raises(InvalidInputs, match="checkpoint_config_url '/etc/passwd' is a path outside MODELS_DIR"):
        runner(models_dir, tmp_path).run(request)
