"""Built-in tiny models: randomly initialised, deterministic pipelines that make the server testable offline.

Each builtin is built in memory by `build_builtin`, saved once with `save_pretrained` (safetensors) into the
models directory by `ensure_builtin`, and from then on loaded from disk like any other model. They are real
pipelines (real tokenizer, UNet, VAE, text encoders, safety checker), only tiny: a 64x64 image with 20 steps
and classifier-free guidance takes well under a second on a CPU. Their images are noise-like; they exist to
exercise the code paths, not to draw.

Top-level imports stay light (no torch, no diffusers): the CLI imports this module to answer `--help`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from collections.abc import Callable
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusers_api.errors import ModelNotFound

from .disk import publish, remove_stale, staged_directory

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Tokenizer

BUILTIN_PREFIX = "builtin/"

# Written last into a finished build; a directory without it (or with an older recipe) is not a model.
COMPLETE_MARKER = "builtin.json"
# Bump when a recipe changes, so directories built by an older recipe are rebuilt instead of reused.
RECIPE_VERSION = 1

TOKENIZER_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# Words the generated BPE learns merges from, until each is one token: ordinary prompts take fewer tokens.
MERGE_CORPUS = """
a an the of and or with in on at to for from by is are was be it this that as my your his her their our
photo photograph picture painting drawing portrait landscape image art artwork illustration render sketch
cat dog bird horse fish lion tiger bear fox wolf rabbit mouse cow sheep animal animals dragon monster
man woman person people child girl boy face eyes hair hand hands body head smile smiling old young
red green blue yellow orange purple pink black white gray grey brown gold golden silver color colors
big small large tiny little beautiful cute pretty dark light bright soft sharp detailed realistic
high quality resolution best masterpiece trending style studio lighting cinematic dramatic night day
sky sun moon star stars cloud clouds rain snow water sea ocean river lake beach mountain mountains forest
tree trees flower flowers grass garden field city street house building castle room window door road
car boat ship train plane space planet earth fire ice wood stone glass metal paper background foreground
sitting standing running walking eating flying playing holding wearing looking under over near
astronaut riding squirrel burger pizza apple banana cake coffee cup table chair book computer robot
"""

SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
# Stable Diffusion XL base ships EulerDiscreteScheduler with these settings.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD_SCHEDULER_CONFIG,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

# SD3 (medium and 3.5) and FLUX.1-dev ship FlowMatchEulerDiscreteScheduler with these settings.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}  # PixArt-Sigma ships DPMSolverMultistepScheduler (DPM-Solver++, 2nd order) over a linear beta schedule.
PIXART_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}

# One seed per component, so that every component is reproducible on its own.
SEED_UNET = 0  # the UNet, or the diffusion transformer
SEED_VAE = 1
SEED_TEXT_ENCODER = 2
SEED_TEXT_ENCODER_2 = 3
SEED_SAFETY_CHECKER = 4
SEED_TEXT_ENCODER_3 = 5
SEED_CONTROL = 6  # a ControlNet's or T2I-Adapter's own weights

# torch's default RNG is global: builds in two threads at once would interleave their draws.
_BUILD_LOCK = threading.Lock()
# Serialises ensure_builtin in one process (threads would only redo the same work); processes race on rename.
_ENSURE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------- public API


def builtin_names() -> list[str]:
    """The built-in pipelines (a request's `model`)."""
    return [BUILTIN_PREFIX + name for name in _RECIPES if BUILTIN_PREFIX + name not in CONTROL_BUILTINS]


def is_builtin(model_id: str) -> bool:
    return model_id.startswith(BUILTIN_PREFIX)


def builtin_dir(model_id: str, models_dir: Path) -> Path:
    """Where the model store keeps `model_id`: "builtin/tiny-sd" -> models_dir/"models--builtin--tiny-sd"."""
    return Path(models_dir) / ("models--" + model_id.replace("/", "--"))


def build_builtin(model_id: str) -> Any:
    """Construct the pipeline in memory. Deterministic: the same recipe always gives the same weights."""
    recipe = _recipe(model_id)
    import torch

    # fork_rng: seeding the recipe must not change the random state of the rest of the server.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        return recipe()


def ensure_builtin(model_id: str, models_dir: Path) -> Path:
    """Return the complete directory of `model_id`, building and publishing it atomically on first use."""
    _recipe(model_id)
    target = builtin_dir(model_id, models_dir)
    if _is_complete(target, model_id):
        return target
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    remove_stale(Path(models_dir))
    with _ENSURE_LOCK:
        # A thread that waited here may find that another one has just published it.
        if not _is_complete(target, model_id):
            _build_and_publish(model_id, target)
    return target


# ---------------------------------------------------------------------------------------------- publishing


def _build_and_publish(model_id: str, target: Path) -> None:
    # Beside the target, so that the final rename stays on one filesystem (and is atomic); held while it is built.
    with staged_directory(target) as staging:
        build_builtin(model_id).save_pretrained(staging, safe_serialization=True)
        _write_marker(staging, model_id)
        # a target without this recipe's marker is half-written or outdated: it is replaced
        publish(staging, target, complete=functools.partial(_is_complete, model_id=model_id), replace_others=True)


def _write_marker(directory: Path, model_id: str) -> None:
    marker = {"model_id": model_id, "recipe_version": RECIPE_VERSION}
    (directory / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _is_complete(directory: Path, model_id: str) -> bool:
    try:
        marker = json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"model_id": model_id, "recipe_version": RECIPE_VERSION}


# ---------------------------------------------------------------------------------------------- recipes


def _recipe(model_id: str) -> Callable[[], Any]:
    recipe = _RECIPES.get(model_id.removeprefix(BUILTIN_PREFIX)) if is_builtin(model_id) else None
    if recipe is None:
        raise ModelNotFound(f"unknown builtin model {model_id!r}", requested=model_id, available=builtin_names())
    return recipe


def _build_tiny_sd() -> DiffusionPipeline:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    return StableDiffusionPipeline(**_sd_components(unet_in_channels=4), requires_safety_checker=True)


def _build_tiny_sd_inpaint() -> DiffusionPipeline:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
        StableDiffusionInpaintPipeline,
    )

    # 4 noisy latent + 1 mask + 4 masked-image latent channels, as in SD inpainting checkpoints.
    return StableDiffusionInpaintPipeline(**_sd_components(unet_in_channels=9), requires_safety_checker=True)


def _sd_components(unet_in_channels: int) -> dict[str, Any]:
    tokenizer = build_clip_tokenizer()
    return {
        "vae": _vae(),
        "text_encoder": _text_encoder(_text_config(tokenizer), SEED_TEXT_ENCODER),
        "tokenizer": tokenizer,
        "unet": _sd_unet(unet_in_channels),
        "scheduler": _sd_scheduler(),
        "safety_checker": _safety_checker(),
        "feature_extractor": _feature_extractor(),
    }


def _build_tiny_sdxl() -> DiffusionPipeline:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**_sdxl_components(unet_in_channels=4))


def _build_tiny_sdxl_inpaint() -> DiffusionPipeline:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
        StableDiffusionXLInpaintPipeline,
    )

    # 4 noisy latent + 1 mask + 4 masked-image latent channels, as in SDXL inpainting checkpoints.
    return StableDiffusionXLInpaintPipeline(**_sdxl_components(unet_in_channels=9))


def _sdxl_components(unet_in_channels: int) -> dict[str, Any]:
    # SDXL's second tokenizer pads with "!" (id 0), the first with the end-of-text token.
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    return {
        "vae": _vae(scaling_factor=0.13025),
        "text_encoder": _text_encoder(_text_config(tokenizer), SEED_TEXT_ENCODER),
        "text_encoder_2": _text_encoder(_text_config(tokenizer_2), SEED_TEXT_ENCODER_2, with_projection=True),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": _sdxl_unet(unet_in_channels),
        "scheduler": _sdxl_scheduler(),
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def _build_tiny_sd3() -> DiffusionPipeline:
    """SD3's layout: two CLIP encoders with projection (their pooled outputs concatenated) and a T5 encoder, whose
    hidden states the CLIP ones are padded to; a 16-channel VAE with a shift factor; patches of 2x2 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    tokenizer_3 = build_t5_tokenizer()
    _seed(SEED_UNET)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=DIT_LATENT_CHANNELS,
        out_channels=DIT_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_HIDDEN_SIZE,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_HIDDEN_SIZE,  # both CLIP encoders' pooled outputs, concatenated
        pos_embed_max_size=LATENT_SIZE,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=_dit_vae(),
        text_encoder=_text_encoder(_text_config(tokenizer), SEED_TEXT_ENCODER, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(_text_config(tokenizer_2), SEED_TEXT_ENCODER_2, with_projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3, SEED_TEXT_ENCODER_3),
        tokenizer_3=tokenizer_3,
    )


def _build_tiny_flux() -> DiffusionPipeline:
    """FLUX.1-dev's layout: CLIP (its pooled output) and T5 (its hidden states), a 16-channel VAE with a shift
    factor, latents packed in 2x2 patches, and guidance given to the transformer as an input (distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    _seed(SEED_UNET)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * DIT_LATENT_CHANNELS,  # 2x2 latents packed into one token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN_SIZE,
        pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        vae=_dit_vae(),
        text_encoder=_text_encoder(_text_config(tokenizer), SEED_TEXT_ENCODER),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, SEED_TEXT_ENCODER_2),
        tokenizer_2=tokenizer_2,
    )


def _build_tiny_pixart() -> DiffusionPipeline:
    """PixArt-Sigma's layout: one T5 encoder (its hidden states and attention mask), SDXL's 4-channel VAE scaling,
    and a transformer that predicts a learned sigma (twice the latent channels). Its sample size is the smallest
    with aspect-ratio bins (32 latents: 256-pixel bins), so the pipeline's default resolution binning works."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline

    tokenizer = build_t5_tokenizer()
    _seed(SEED_UNET)
    transformer = PixArtTransformer2DModel(
        sample_size=2 * LATENT_SIZE,
        patch_size=2,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,  # the inner dimension, which the caption projection maps T5's states to
        caption_channels=T5_HIDDEN_SIZE,
        use_additional_conditions=False,  # as Sigma's config: no resolution or aspect-ratio conditioning
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, SEED_TEXT_ENCODER),
        vae=_vae(scaling_factor=0.13025),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler.from_config(PIXART_SCHEDULER_CONFIG),
    )


def _build_tiny_controlnet() -> Any:
    """A ControlNet for tiny-sd: its UNet's encoder (as ControlNetModel.from_unet makes one), whose zero-initialised
    output convolutions get random weights, so that the condition changes the image as a trained one would."""
    return _controlnet(_sd_unet(in_channels=4))


def _build_tiny_controlnet_sdxl() -> Any:
    """A ControlNet for tiny-sdxl (with its text-and-time embedding), made the same way."""
    return _controlnet(_sdxl_unet())


def _build_tiny_t2i_adapter() -> Any:
    """A T2I-Adapter for tiny-sd: one feature map per down block of its UNet, at the shapes the UNet adds them
    (32 channels after the first block's downsampling, 64 in the second block): the XL layout, whose second block
    does not downsample, fits that; the pixels are unshuffled by 8 (the VAE's 4, then the first downsampling)."""
    from diffusers import T2IAdapter

    _seed(SEED_CONTROL)
    return T2IAdapter(
        in_channels=3, channels=list(UNET_CHANNELS), num_res_blocks=1, downscale_factor=8,
        adapter_type="full_adapter_xl",
    )  # fmt: skip


def _controlnet(unet: Any) -> Any:
    import torch
    from diffusers import ControlNetModel

    # The condition image is at pixel size: 2 stride-2 convolutions bring it to the latents' (VAE_SCALE_FACTOR 4).
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32))
    _seed(SEED_CONTROL)
    zero_convolutions = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in zero_convolutions:
            conv.weight.normal_(std=0.2)
            conv.bias.normal_(std=0.2)
    return controlnet


_RECIPES: dict[str, Callable[[], Any]] = {
    "tiny-sd": _build_tiny_sd,
    "tiny-sd-inpaint": _build_tiny_sd_inpaint,
    "tiny-sdxl": _build_tiny_sdxl,
    "tiny-sdxl-inpaint": _build_tiny_sdxl_inpaint,
    "tiny-sd3": _build_tiny_sd3,
    "tiny-flux": _build_tiny_flux,
    "tiny-pixart": _build_tiny_pixart,
    # control models (models/controls.py): not pipelines, loaded only as a request's `controlnet`
    "tiny-controlnet": _build_tiny_controlnet,
    "tiny-controlnet-sdxl": _build_tiny_controlnet_sdxl,
    "tiny-t2i-adapter": _build_tiny_t2i_adapter,
}
CONTROL_BUILTINS = frozenset(
    BUILTIN_PREFIX + name for name in ("tiny-controlnet", "tiny-controlnet-sdxl", "tiny-t2i-adapter")
)


def build_tiny_upscaler() -> dict[str, Any]:
    """The state dict of `builtin/tiny-upscaler` (models/upscalers.py): a Real-ESRGAN Compact x4 network
    (SRVGGNetCompact, as realesr-general-x4v3) with 8 features and 2 convolutions, randomly initialised from a
    fixed seed. Not a pipeline, so not among `builtin_names()`: the upscalers name it."""
    import torch

    from .upscalers import SEED_TINY_UPSCALER, import_spandrel

    import_spandrel()
    from spandrel.architectures.Compact import Compact

    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        _seed(SEED_TINY_UPSCALER)
        network = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu")
        return {key: value.contiguous() for key, value in network.state_dict().items()}


# ---------------------------------------------------------------------------------------------- components

# The UNet sees 16x16 latents; with the VAE's factor of 4 (three blocks) the default image is 64x64 pixels.
# The UNet runs at every step, so a small latent is what keeps 20 steps with guidance well under a second.
LATENT_SIZE = 16
UNET_CHANNELS = (32, 64)
UNET_NORM_GROUPS = 32
# The VAE runs once per image, but weighs the most on disk at SD widths: narrower keeps a model a few MB.
VAE_CHANNELS = (16, 32, 32)
VAE_NORM_GROUPS = 8
VAE_SCALE_FACTOR = 2 ** (len(VAE_CHANNELS) - 1)
TEXT_HIDDEN_SIZE = 32
# The diffusion transformers' VAE has 16 latent channels, as SD3's and Flux's do.
DIT_LATENT_CHANNELS = 16
# T5's hidden size: at least both CLIP encoders' together, which SD3 pads to it.
T5_HIDDEN_SIZE = 2 * TEXT_HIDDEN_SIZE
# The safety checker looks at the image resized and cropped to this size: small, so that the check is cheap.
FEATURE_SIZE = 32


def _seed(seed: int) -> None:
    """Seed the CPU generator that module initialisers draw from (torch.manual_seed would reseed CUDA too)."""
    import torch

    torch.default_generator.manual_seed(seed)


def _sd_unet(in_channels: int) -> Any:
    from diffusers import UNet2DConditionModel

    _seed(SEED_UNET)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        norm_num_groups=UNET_NORM_GROUPS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
    )


def _sdxl_unet(in_channels: int = 4) -> Any:
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8
    _seed(SEED_UNET)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        norm_num_groups=UNET_NORM_GROUPS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        # Both text encoders' hidden states, concatenated.
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # Six micro-conditioning numbers (original size, crop, target size) + the pooled text embedding.
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN_SIZE,
    )


def _vae(scaling_factor: float = 0.18215, latent_channels: int = 4, **options: Any) -> Any:
    from diffusers import AutoencoderKL

    _seed(SEED_VAE)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        norm_num_groups=VAE_NORM_GROUPS,
        latent_channels=latent_channels,
        sample_size=VAE_SCALE_FACTOR * LATENT_SIZE,
        scaling_factor=scaling_factor,
        **options,
    )


def _dit_vae() -> Any:
    """SD3's and Flux's VAE: 16 latent channels, a shift factor, no quant convolutions."""
    return _vae(
        scaling_factor=1.5305,
        latent_channels=DIT_LATENT_CHANNELS,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _sd_scheduler() -> Any:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG)


def _sdxl_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN_SIZE,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        # Not 2: CLIP then pools at the first end-of-text token, as the real checkpoints do.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _text_encoder(config: CLIPTextConfig, seed: int, with_projection: bool = False) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _seed(seed)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _t5_encoder(tokenizer: T5Tokenizer, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_HIDDEN_SIZE,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    _seed(seed)
    return T5EncoderModel(config).eval()


def _safety_checker() -> Any:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        # The checker has no text tower; its config is only sized down so that it does not describe a big one.
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": FEATURE_SIZE,
            "patch_size": 4,
        },
        projection_dim=32,
    )
    _seed(SEED_SAFETY_CHECKER)
    checker = StableDiffusionSafetyChecker(config).eval()
    _randomise_concepts(checker)
    return checker


def _randomise_concepts(checker: Any) -> None:
    """Give the concept embeddings random directions, and thresholds of 1.0 so that nothing is ever flagged.

    A concept is flagged when cosine(image, concept) - threshold > 0; a cosine never exceeds 1, so with every
    threshold at 1.0 the check runs in full and deterministically flags no image, whatever the weights.
    """
    import torch

    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)


def _feature_extractor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": FEATURE_SIZE},
        do_center_crop=True,
        crop_size={"height": FEATURE_SIZE, "width": FEATURE_SIZE},
    )


# ---------------------------------------------------------------------------------------------- tokenizer


def build_clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A real byte-level BPE CLIPTokenizer laid out like CLIP's, with a small generated vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),  # type: ignore[arg-type]  # annotated list[str], but the BPE wants pairs
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=TOKENIZER_MAX_LENGTH,
    )


T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
WORD_START = "▁"  # SentencePiece's mark of a word's start ("▁")
T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&%+=*#@ "


def build_t5_tokenizer() -> T5Tokenizer:
    """A real Unigram T5Tokenizer laid out like T5's: pad, end and unknown first, then the pieces. Every word of
    MERGE_CORPUS is one piece; other text falls back to single characters, each its own piece."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD)


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs. The Unigram model picks the segmentation of highest total score, so a
    whole word (-1) beats spelling it out (-4 per character)."""
    words = dict.fromkeys(MERGE_CORPUS.split())
    characters = dict.fromkeys(T5_CHARACTERS.replace(" ", ""))
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (WORD_START, -2.0)]
    vocab += [(WORD_START + word, -1.0) for word in words]
    vocab += [(char, -4.0) for char in characters] + [(WORD_START + char, -4.0) for char in characters]
    return vocab


@cache
def clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's layout: the 256 byte characters, their end-of-word forms, the merged tokens, BOS and EOS."""
    byte_chars = list(bytes_to_unicode().values())
    merges = learn_merges(MERGE_CORPUS.split())
    tokens = byte_chars + [char + END_OF_WORD for char in byte_chars]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))  # two merges can make the same token
    return vocab, tuple(merges)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of bytes to printable characters (BPE never sees spaces or controls)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    unprintable = [byte for byte in range(256) if byte not in printable]
    chars = [chr(byte) for byte in printable] + [chr(256 + shift) for shift in range(len(unprintable))]
    return dict(zip(printable + unprintable, chars, strict=True))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent adjacent pair (ties alphabetically) until none is left."""
    corpus = Counter(_word_symbols(word) for word in words)
    merges: list[tuple[str, str]] = []
    while pairs := _pair_counts(corpus):
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        corpus = Counter({_merge_pair(symbols, best): freq for symbols, freq in corpus.items()})
    return merges


def _word_symbols(word: str) -> tuple[str, ...]:
    encoded = [bytes_to_unicode()[byte] for byte in word.encode("utf-8")]
    return (*encoded[:-1], encoded[-1] + END_OF_WORD)


def _pair_counts(corpus: Counter[tuple[str, ...]]) -> Counter[tuple[str, str]]:
    pairs: Counter[tuple[str, str]] = Counter()
    for symbols, freq in corpus.items():
        for pair in pairwise(symbols):
            pairs[pair] += freq
    return pairs


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)
