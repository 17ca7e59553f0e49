"""CudaGraphForward: eager off CUDA; on a GPU, graph replay matches the eager step (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusers_api.denoising.forward import eager_forward
from diffusers_api.denoising.graphs import CudaGraphForward, _padded


@pytest.fixture(scope="module")
def tiny_unet(models_dir: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from diffusers_api.models.builtin import ensure_builtin

    return UNet2DConditionModel.from_pretrained(ensure_builtin("builtin/tiny-sd", models_dir) / "unet").eval()


def inputs(unet: torch.nn.Module, rows: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    config = unet.config
    sample = torch.randn(rows, config.in_channels, 16, 16, generator=generator).to(device)
    timesteps = torch.linspace(900, 100, rows).to(device)
    hidden = torch.randn(rows, 77, config.cross_attention_dim, generator=generator).to(device)
    return sample, timesteps, hidden


def test_off_cuda_it_is_the_eager_step(tiny_unet: torch.nn.Module) -> None:
    forward = CudaGraphForward()
    sample, timesteps, hidden = inputs(tiny_unet, 3, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(
            forward(tiny_unet, sample, timesteps, hidden, None),
            eager_forward(tiny_unet, sample, timesteps, hidden, None),
        )
    assert forward.captures == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_matches_eager_with_padding(tiny_unet: torch.nn.Module) -> None:
    unet = tiny_unet.to("cuda")
    forward = CudaGraphForward()
    with torch.no_grad():
        for rows in (3, 2, 3, 5):  # 3 and 5 are padded to buckets 4 and 8; 3 twice replays the same graph
            sample, timesteps, hidden = inputs(unet, rows, "cuda")
            graphed = forward(unet, sample, timesteps, hidden, None)
            # the replay is the eager step at the bucket's batch size, padding rows dropped ...
            bucket = next(b for b in forward.buckets if b >= rows)
            padded = [_padded(t, bucket) for t in (sample, timesteps, hidden)]
            torch.testing.assert_close(graphed, eager_forward(unet, *padded, None)[:rows], rtol=1e-5, atol=1e-5)
            # ... which differs from the unpadded step only by the rounding of other kernel choices (TF32)
            eager = eager_forward(unet, sample, timesteps, hidden, None)
            torch.testing.assert_close(graphed, eager, rtol=0.0, atol=5e-3)
    assert forward.captures == 3
    assert forward.replays == 4
