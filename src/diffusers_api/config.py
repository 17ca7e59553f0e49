"""Settings: the only place the environment is read.

Environment names are those of docker-diffusers-api (MODEL_ID, PIPELINE, SCHEDULER, ...) plus the new ones of
diffusers-api (MODELS_DIR, API_KEY, HOST, PORT, ...). Command-line flags override them: the CLI builds
`Settings(**flags)` and init arguments win over the environment. Tests build `Settings(...)` directly.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Precision = Literal["", "fp16", "bf16", "fp32"]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_bytes(text: str) -> int:
    """ "12GB" -> 12e9, "8GiB" -> 8 * 2**30, "1500000" -> 1500000 (units are case-insensitive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes or a unit: 500MB, 12GB, 8GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


RUNPOD_VOLUME = Path("/runpod-volume")

# The Real-ESRGAN weights the original server offered (`use_extra: "upsample"`), from their official releases.
DEFAULT_UPSCALER_URLS = {
    "RealESRGAN_x4plus": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
    "RealESRGAN_x4plus_anime_6B": (
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth"
    ),
    "realesr-general-x4v3": (
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-general-x4v3.pth"
    ),
}


UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


def parse_name_urls(text: str) -> dict[str, str]:
    """ "a=https://x/a.pth, b=/models/b.safetensors" -> {"a": ..., "b": ...}."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, url = item.partition("=")
        if not equals or not name.strip() or not url.strip():
            raise ValueError(f"not a name=url pair: {item!r}")
        pairs[name.strip()] = url.strip()
    return pairs


def _check_weights_files(urls: dict[str, str]) -> dict[str, str]:
    for name, url in urls.items():
        if not urlsplit(url).path.lower().endswith(UPSCALER_SUFFIXES):
            raise ValueError(f"{name}={url}: expected a {', '.join(UPSCALER_SUFFIXES)} file")
    return urls


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def default_models_dir(volume: Path = RUNPOD_VOLUME) -> Path:
    """On RunPod with a network volume attached, keep models there so that every worker shares one download
    and a cold start reads weights instead of fetching them; elsewhere the user's cache directory."""
    if volume.is_dir():
        return volume / "diffusers-api"
    return Path("~/.cache/diffusers-api").expanduser()


class Settings(BaseSettings):
    """Every knob of the server. Field names are the lower-case environment names."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    # --- the model ---------------------------------------------------------------------------------------
    model_id: str | None = Field(None, description="Model served by default (hub id, local dir, builtin/...)")
    hf_model_id: str | None = Field(None, description="Hub repository when MODEL_ID is only an alias")
    model_revision: str | None = None
    model_precision: Precision = Field("", description="fp16, bf16, fp32, or empty for the model's default")
    model_variant: str | None = Field(None, description="Weight-file variant, e.g. fp16")
    model_url: str | None = Field(None, description="Cloud-cache archive URL")
    checkpoint_url: str | None = Field(None, description="Single-file checkpoint to convert")
    checkpoint_config_url: str | None = Field(
        None, description="Original-SD .yaml config used to convert CHECKPOINT_URL (diffusers' original_config)"
    )
    pipeline: str | None = Field(None, description="Default pipeline (class name or txt2img/img2img/inpaint)")
    scheduler: str = Field("DPMSolverMultistepScheduler", description="Default scheduler (class or alias)")
    fill_mode: Literal["none", "patchmatch", "edge"] = Field(
        "none",
        description="How inpainting requests pre-fill the transparent (or masked) area of their image: patchmatch,"
        " edge (nearest opaque pixel), or none",
    )
    runtime_downloads: bool = Field(False, description="Allow requests to name any model")
    hf_auth_token: SecretStr | None = Field(None, validation_alias=_env("HF_AUTH_TOKEN", "HF_TOKEN"))
    offline: bool = Field(False, description="Never touch the network: load models from MODELS_DIR only")
    allow_pickle: bool = Field(False, description="Allow pickled .ckpt checkpoints (they can run code)")
    allow_private_urls: bool = Field(
        False,
        description="Allow model and checkpoint URLs, S3 endpoints named in them and a request's SEND_URL on private,"
        " loopback or link-local addresses",
    )
    model_memory_budget: int | None = Field(
        None, description="Bytes of weights kept resident (e.g. 12GB, 8GiB); unset: one model at a time"
    )
    download_timeout_s: float = Field(60.0, gt=0, description="Connect/read timeout of every model transfer")
    lora_max_bytes: int = Field(
        2 * 1024**3, ge=1, description="Largest LoRA or embedding file a request may download (e.g. 500MB, 2GiB)"
    )
    lora_variants_kept: int = Field(
        2, ge=1, le=64, description="Variants with LoRAs or embeddings (one per set of them) kept per loaded model"
    )
    models_dir: Path = Field(
        default_factory=default_models_dir,
        description="Where models are stored (default /runpod-volume/diffusers-api when that volume exists)",
    )
    local_model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated directories, besides MODELS_DIR, whose model directories, configurations and"
        " checkpoints a request may name (RUNTIME_DOWNLOADS=1)",
    )
    device: str = Field("auto", description="auto, cuda, cuda:N, mps or cpu")
    upscaler_urls: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_UPSCALER_URLS),
        description="Upscalers a request may name (/v1/upscale, use_extra: upsample): comma-separated name=url"
        " pairs (http(s) URL or local path of a .safetensors or .pth file), added to the Real-ESRGAN defaults",
    )
    upscale_tile: int = Field(
        0,
        ge=0,
        description="Upscale in tiles of this many input pixels a side (each with a margin of its neighbours');"
        " 0: the whole image at once, in tiles only after that ran out of memory",
    )

    # --- cloud cache ---------------------------------------------------------------------------------------
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_default_region: str | None = None
    aws_s3_endpoint_url: str | None = None
    aws_s3_default_bucket: str | None = None

    # --- events --------------------------------------------------------------------------------------------
    send_url: str | None = Field(None, description="Webhook receiving lifecycle and progress events")
    sign_key: SecretStr | None = Field(None, description="HMAC-SHA256 key signing webhook bodies")
    container_id: str = Field(
        default_factory=socket.gethostname,
        validation_alias=_env("CONTAINER_ID", "RUNPOD_POD_ID", "container_id"),
        description="Names this process in events (default: RunPod's pod id, else the host name)",
    )
    progress_interval_s: float = Field(1.0, ge=0, description="Least time between progress events per request")
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description="Per attempt; a slow receiver is cut off")
    webhook_retries: int = Field(3, ge=0, le=10, description="Extra attempts for lifecycle events, with backoff")
    webhook_queue_size: int = Field(256, ge=1, description="Undelivered events beyond this are dropped")

    # --- RunPod --------------------------------------------------------------------------------------------
    runpod_concurrency: int | None = Field(
        None, ge=1, le=256, description="Jobs one RunPod worker holds at once (default: MAX_BATCH_SIZE, so they batch)"
    )

    # --- HTTP ----------------------------------------------------------------------------------------------
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="Bearer token required by HTTP endpoints when set")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest accepted request body")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="Largest input or output image")
    max_prompt_chars: int = Field(
        10_000, ge=1, description="Longest prompt or negative prompt in characters (CLIP reads 77 tokens of it)"
    )
    max_images: int = Field(
        32, ge=1, le=4096, description="Most images one request makes: its prompts x num_images_per_prompt"
    )
    max_queue: int = Field(64, ge=1, description="Requests waiting beyond this get BUSY (503)")
    jobs_ttl_s: float = Field(600.0, gt=0, description="How long a finished /v1/jobs job stays readable")
    jobs_kept: int = Field(100, ge=1, le=100_000, description="Finished jobs kept at most; the oldest go first")
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="At SIGTERM, how long work in flight may finish before it is cancelled"
    )

    # --- engine --------------------------------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256, description="Images denoised together; 1: one request at a time")
    cuda_graphs: bool = Field(
        True, description="Replay batched UNet and diffusion-transformer steps as CUDA graphs on a CUDA device"
    )
    batch_wait_ms: int = Field(
        250, ge=1, le=10_000, description="Longest a step waits for a request still busy between its steps"
    )
    decode_batch_max: int = Field(
        8,
        ge=1,
        le=256,
        description="Most images that one VAE call decodes for requests finishing their steps together; 1: each"
        " request decodes alone",
    )
    encode_batch_max: int = Field(
        8,
        ge=1,
        le=256,
        description="Most prompts that one text-encoder call encodes for requests arriving while an encode runs; 1:"
        " each request encodes alone",
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile the UNet or diffusion transformer (SD3, Flux, PixArt) in the background; eager steps "
            "serve until each shape is compiled"
        ),
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="Inductor mode; max-autotune-no-cudagraphs compiles much longer for faster kernels"
    )
    compile_cache_dir: Path | None = Field(
        None,
        validation_alias=_env("COMPILE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "compile_cache_dir"),
        description="torch.compile's on-disk caches, reused across restarts (default MODELS_DIR/torch-compile)",
    )
    debug: bool = False
    log_level: str = "info"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("models_dir", mode="after")
    @classmethod
    def _expand_models_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("local_model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(root.strip()).expanduser() for root in value.split(",") if root.strip()]
        return value

    @field_validator("upscaler_urls", mode="before")
    @classmethod
    def _with_default_upscalers(cls, value: object) -> object:
        if isinstance(value, str):
            value = parse_name_urls(value)
        if isinstance(value, dict):
            return _check_weights_files(DEFAULT_UPSCALER_URLS | value)
        return value

    @field_validator("model_memory_budget", "lora_max_bytes", mode="before")
    @classmethod
    def _parse_bytes(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_bytes(value)
        return value

    @field_validator("fill_mode", mode="before")
    @classmethod
    def _lower_fill_mode(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("model_precision", mode="before")
    @classmethod
    def _normalize_precision(cls, value: object) -> object:
        aliases = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "full": "fp32"}
        if isinstance(value, str):
            return aliases.get(value.strip().lower(), value.strip().lower())
        return value
