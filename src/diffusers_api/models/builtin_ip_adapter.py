"""Built-in tiny IP-Adapters: `builtin/tiny-ip-adapter` (for builtin/tiny-sd) and `builtin/tiny-ip-adapter-sdxl`
(for builtin/tiny-sdxl), generated offline and seeded like the tiny models (models/builtin.py).

Each is laid out as diffusers' `load_ip_adapter` reads the original IP-Adapter repositories (h94/IP-Adapter):

    ip-adapter.safetensors     image_proj.* (the image projection) and ip_adapter.<n>.to_{k,v}_ip.weight
    image_encoder/             a CLIPVisionModelWithProjection and its CLIPImageProcessor

The weights are diffusers' own modules (`ImageProjection`, `IPAdapterAttnProcessor2_0`), sized to the tiny UNet's
cross-attention layers and the encoder's projection, and saved under the original names: the exact inverse of
diffusers' conversion (`UNet2DConditionModel._convert_ip_adapter_*_to_diffusers`), which loading runs.

Top-level imports stay light (no torch, no diffusers).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

from ..errors import ModelNotFound
from . import builtin
from .disk import publish, remove_stale, staged_directory

WEIGHT_NAME = "ip-adapter.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"
# The original IP-Adapter turns one image embedding into 4 extra cross-attention tokens.
IMAGE_TOKENS = 4
# The image encoder: CLIP ViT laid out small; it sees the image at the tiny models' feature size (32 px), which
# is what tiny-sd's feature extractor (its safety checker's) gives it.
IMAGE_EMBED_DIM = 32
SEED_IMAGE_ENCODER = 6
SEED_IP_ADAPTER = 7

# name -> the UNet recipe of the model it fits
_UNETS = {"tiny-ip-adapter": "sd", "tiny-ip-adapter-sdxl": "sdxl"}
_ENSURE_LOCK = threading.Lock()


def ip_adapter_builtin_names() -> list[str]:
    return [builtin.BUILTIN_PREFIX + name for name in _UNETS]


def ensure_builtin_ip_adapter(model_id: str, models_dir: Path) -> Path:
    """The complete directory of the builtin IP-Adapter `model_id`, built and published atomically on first use."""
    name = model_id.removeprefix(builtin.BUILTIN_PREFIX)
    if name not in _UNETS:
        raise ModelNotFound(
            f"unknown builtin IP-Adapter {model_id!r}", requested=model_id, available=ip_adapter_builtin_names()
        )
    target = builtin.builtin_dir(model_id, models_dir)
    complete = functools.partial(builtin._is_complete, model_id=model_id)
    if complete(target):
        return target
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    remove_stale(Path(models_dir))
    with _ENSURE_LOCK:
        if not complete(target):
            with staged_directory(target) as staging:
                save_ip_adapter(name, staging)
                builtin._write_marker(staging, model_id)
                publish(staging, target, complete=complete, replace_others=True)
    return target


def save_ip_adapter(name: str, directory: Path) -> None:
    """Build the IP-Adapter `name` (deterministically) and save it into `directory`."""
    import torch
    from safetensors.torch import save_file

    with builtin._BUILD_LOCK, torch.random.fork_rng(devices=[]):
        unet = builtin._sd_unet(4) if _UNETS[name] == "sd" else builtin._sdxl_unet(4)
        encoder, processor = _image_encoder()
        weights = _adapter_weights(unet)
    save_file(weights, str(directory / WEIGHT_NAME))
    encoder.save_pretrained(directory / IMAGE_ENCODER_FOLDER, safe_serialization=True)
    processor.save_pretrained(directory / IMAGE_ENCODER_FOLDER)


def _image_encoder() -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=builtin.FEATURE_SIZE,
        patch_size=4,
        projection_dim=IMAGE_EMBED_DIM,
    )
    builtin._seed(SEED_IMAGE_ENCODER)
    encoder = CLIPVisionModelWithProjection(config).eval()
    size = builtin.FEATURE_SIZE
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return encoder, processor


def _adapter_weights(unet: Any) -> dict[str, Any]:
    """The original file's tensors: `image_proj.*` of an ImageProjection, and for the n-th attention processor
    of the UNet (counted as diffusers' conversion counts them: 1, 3, 5, ... over the cross-attention ones)
    `ip_adapter.<n>.to_k_ip.weight` and `to_v_ip.weight` of an IPAdapterAttnProcessor2_0."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection

    cross_dim = unet.config.cross_attention_dim
    builtin._seed(SEED_IP_ADAPTER)
    projection = ImageProjection(
        image_embed_dim=IMAGE_EMBED_DIM, cross_attention_dim=cross_dim, num_image_text_embeds=IMAGE_TOKENS
    )
    weights = {f"image_proj.{key.replace('image_embeds', 'proj')}": t for key, t in projection.state_dict().items()}
    key_id = 1
    # named_modules walks the UNet in the order of `attn_processors`, which the conversion numbers by
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or name.endswith("attn1"):
            continue
        processor = IPAdapterAttnProcessor2_0(
            hidden_size=module.to_k.out_features, cross_attention_dim=cross_dim, num_tokens=(IMAGE_TOKENS,)
        )
        for layer in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key_id}.{layer}.weight"] = processor.state_dict()[f"{layer}.0.weight"]
        key_id += 2
    return {key: tensor.contiguous() for key, tensor in weights.items()}
