"""Tiny LoRA files for the built-in tiny models, made with peft the way training scripts make them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(model_dir: Path, out_dir: Path, seed: int, text_encoders: bool = True) -> Path:
    """A LoRA (rank 4, random non-zero weights) for the UNet and, with `text_encoders`, the text encoders of the
    diffusers model in `model_dir`, saved with the pipeline's own `save_lora_weights`. Returns the file."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(seed)
    # init_lora_weights=False: both factors random, so the LoRA changes what the model computes
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights=False))
    layers: dict[str, Any] = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if text_encoders:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                config = LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS, init_lora_weights=False)
                inject_adapter_in_model(config, encoder)
                layers[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
    type(pipe).save_lora_weights(out_dir, **layers)
    return out_dir / "pytorch_lora_weights.safetensors"


def make_embedding(path: Path, seed: int, token: str | None, sdxl: bool = False, dim: int = 32) -> Path:
    """A textual-inversion embedding of one vector: diffusers' own format ({token: vector}) for SD, and for SDXL
    the usual {"clip_l", "clip_g"} pair (its token is given apart, as such files require)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    if sdxl:
        tensors = {
            "clip_l": torch.randn(1, dim, generator=generator),
            "clip_g": torch.randn(1, dim, generator=generator),
        }
    else:
        assert token is not None
        tensors = {token: torch.randn(dim, generator=generator)}
    save_file(tensors, str(path))
    return path
