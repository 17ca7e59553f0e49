"""An original-format (LDM / "A1111") single-file checkpoint made from a tiny diffusers SD pipeline.

diffusers only converts *from* the original layout, so this is the inverse of its converters in
`diffusers.loaders.single_file_utils` (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint), for the SD-1 layout our tiny model has. Its round trip through diffusers'
`from_single_file` is what the single-file tests check, tensor for tensor.
"""

from __future__ import annotations

import re
from typing import Any

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"))
_RESNET += (("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def ldm_state_dict(pipe: Any) -> dict[str, Any]:
    unet = {UNET + _unet_key(k, pipe.unet.config): v for k, v in pipe.unet.state_dict().items()}
    vae = {VAE + _vae_key(k, len(pipe.vae.config.up_block_types)): v for k, v in pipe.vae.state_dict().items()}
    # transformers 5 names CLIP's keys without the `text_model.` that original checkpoints carry.
    clip = {CLIP + k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    return {k: v.contiguous() for k, v in (unet | vae | clip).items()}


def _direct(section: str) -> dict[str, str]:
    """diffusers' own table of the names that map one to one (diffusers name -> LDM name)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping: dict[str, str] = (
        DIFFUSERS_TO_LDM_MAPPING[section]["layers"] if section == "unet" else (DIFFUSERS_TO_LDM_MAPPING[section])
    )
    return mapping


def _renamed(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        rest = rest.replace(old, new)
    return rest


def _unet_key(key: str, config: Any) -> str:
    if key in _direct("unet"):
        return _direct("unet")[key]
    per_block = config.layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + layer
        return (
            f"input_blocks.{index}.0.{_renamed(rest, _RESNET)}"
            if kind == "resnets"
            else f"input_blocks.{index}.1.{rest}"
        )
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_block + config.layers_per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_renamed(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        return (
            f"output_blocks.{index}.0.{_renamed(rest, _RESNET)}"
            if kind == "resnets"
            else f"output_blocks.{index}.1.{rest}"
        )
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if "CrossAttn" in config.up_block_types[block] else 1
        return f"output_blocks.{block * per_block + config.layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def _vae_key(key: str, up_blocks: int) -> str:
    if key in _direct("vae"):
        return _direct("vae")[key]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_renamed(m[2], _VAE_ATTENTION)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{up_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise KeyError(f"no LDM name for VAE key {key}")
