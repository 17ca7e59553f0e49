"""DreamBooth training of a Stable Diffusion 1.x/2.x or SDXL model: a LoRA of the UNet's attention, or the whole
UNet (and, for SD 1.x/2.x, the text encoder too).

Two steps, so that only the first holds the device (the engine runs it alone, `Engine.run_alone`):

    train(store, request, workdir, ...)  -> the LoRA's .safetensors, or the fine-tuned model's directory, in
                                            `workdir`; the served model is never changed (the UNet is copied)
    deliver(trained, request, ...)       -> packed (.tar.zst for a full fine-tune), uploaded to dest_url (S3),
                                            kept in MODELS_DIR as `trained/<name>`

The loop is diffusers' DreamBooth example's, without accelerate: each step encodes a batch of instance images
(random or centre crops) with the VAE, adds noise at random timesteps, and regresses the UNet's prediction on
the noise (or the velocity, for v-prediction models). With prior preservation each step also takes as many
class images, with the class prompt, and adds their loss times prior_loss_weight; the class images are the
request's, and those missing are generated first by the model itself (its txt2img pipeline, no safety checker,
seeded from the training's seed), as the example generates them. A LoRA is peft's, on the attention projections
(to_q, to_k, to_v, to_out.0), saved in diffusers' LoRA format, so that `lora_weights` loads it. Cancelling stops
at the next step. SDXL (diffusers' train_dreambooth_lora_sdxl.py) takes its prompts from both text encoders (the
pipeline's own encode_prompt: penultimate hidden states, the second's pooled embedding) and the size
micro-conditions of a square crop at the training resolution; its VAE encodes in float32 where its config asks
for that (`force_upcast`: SDXL's fp16 VAE overflows). torch, diffusers and peft are imported here, lazily.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import imaging
from .errors import Cancelled, DiffusersAPIError, InvalidInputs, PipelineError
from .models import archive, disk, transfer
from .models.locations import ARCHIVE_SUFFIX, S3Location, parse_model_url
from .models.sources import phase
from .models.trained import trained_lora_path, trained_model_dir
from .schema import GenerateRequest
from .schema.train import TrainRequest, TrainResult

if TYPE_CHECKING:
    from PIL import Image

    from .config import Settings
    from .models.store import LoadedModel, ModelStore

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet's attention projections
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the CLIP text encoder's (diffusers' example's)
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name (save_lora_weights)
Progress = Callable[[int, int], None]
Emit = Callable[[str, str], None]


@dataclass
class Trained:
    """What `train` left in its work directory."""

    mode: str
    path: Path  # the LoRA file, or the model directory
    steps: int
    loss: float
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- checks


def destination(request: TrainRequest, settings: Settings) -> S3Location | None:
    """Where dest_url points (checked before training, so that a bad URL costs no training)."""
    if request.dest_url is None:
        return None
    stem = request.name or "trained"
    default = f"{stem}.safetensors" if request.train_mode == "lora" else f"models--trained--{stem}{ARCHIVE_SUFFIX}"
    try:
        location = parse_model_url(request.dest_url, default, settings)
    except InvalidInputs as exc:
        raise InvalidInputs(exc.message.replace("MODEL_URL", "dest_url"), field="dest_url") from None
    assert isinstance(location, S3Location)  # the schema takes s3 URLs only
    return location


def check_name_free(request: TrainRequest, settings: Settings) -> None:
    """A kept result never replaces another: a loaded model or a LoRA variant may be using it."""
    if request.trained_id is None:
        return
    path = _kept_path(request, settings)
    if path.exists():
        raise InvalidInputs(f"name: {request.trained_id} exists already ({path}); choose another name", field="name")


def _kept_path(request: TrainRequest, settings: Settings) -> Path:
    assert request.trained_id is not None
    if request.train_mode == "lora":
        return trained_lora_path(request.trained_id, settings.models_dir)
    return trained_model_dir(request.trained_id, settings.models_dir)


# --------------------------------------------------------------------------------------------- training


def train(
    store: ModelStore,
    request: TrainRequest,
    workdir: Path,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    timings: dict[str, float] | None = None,
) -> Trained:
    """Train on the store's model (loading it if needed) and save the result into `workdir`. Never changes the
    loaded model. Raises DiffusersAPIError (InvalidInputs for what the model cannot train on, Cancelled)."""
    try:
        return _train(store, request, workdir, progress, cancel, timings)
    except DiffusersAPIError:
        raise
    except Exception as exc:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise PipelineError(
                f"out of GPU memory while training: {exc}; try train_mode lora, a smaller resolution or "
                "train_batch_size, or gradient_checkpointing"
            ) from exc
        log.exception("training failed")
        raise PipelineError(f"training failed: {type(exc).__name__}: {exc}") from exc


def _train(
    store: ModelStore,
    request: TrainRequest,
    workdir: Path,
    progress: Progress | None,
    cancel: threading.Event | None,
    timings: dict[str, float] | None,
) -> Trained:
    import torch

    settings = store.settings
    model = store.get(GenerateRequest(**request.model_request()), timings)
    parts = _sd_parts(model, request)
    resolution = request.resolution or parts["default_resolution"]
    _check_resolution(resolution, parts["multiple"])
    images = [_fitted(image, resolution) for image in _decode(request.instance_images, "instance_images", settings)]
    seed = request.seed if request.seed is not None else random.randrange(2**31)
    given = _decode(request.class_images[: request.class_image_count], "class_images", settings)
    with phase(timings, "class_images") if request.with_prior_preservation else _nothing():
        made = _generated_class_images(model, request, request.class_image_count - len(given), resolution, seed, cancel)
    classes = [_fitted(image, resolution) for image in given + made]
    with phase(timings, "training"), torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the LoRA's initial weights (peft draws them on the CPU)
        unet = _trainable_unet(parts["unet"], request)
        encoder = _trainable_text_encoder(parts["text_encoder"], request) if request.train_text_encoder else None
        loss = _loop((unet, encoder), parts, (images, classes), resolution, request, seed, progress, cancel)
        path = _save(unet, encoder, model, request, workdir)
    meta = {"MODEL_ID": model.spec.model_id, "PRECISION": model.precision, "device": model.device, "seed": seed}
    meta |= {"resolution": resolution, "learning_rate": request.effective_learning_rate}
    meta["train_text_encoder"] = request.train_text_encoder
    meta["family"] = parts["family"]
    if request.with_prior_preservation:
        meta["class_images"] = {"given": len(given), "generated": len(made)}
    return Trained(request.train_mode, path, request.max_train_steps, loss, meta)


def _sd_parts(model: LoadedModel, request: TrainRequest | None = None) -> dict[str, Any]:
    """The components DreamBooth trains with; INVALID_INPUTS for models it cannot (SD3, Flux, inpainting, the SDXL
    refiner) and, on SDXL, for train_text_encoder."""
    components = model.pipelines.components
    unet = components.get("unet")
    family = type(model.pipelines.base).__name__
    sdxl = components.get("text_encoder_2") is not None
    supported = f"Stable Diffusion 1.x/2.x and SDXL models; {model.spec.model_id} is a {family}"
    if unet is None or components.get("vae") is None or components.get("text_encoder") is None:
        raise InvalidInputs(f"training supports {supported}", model=family)
    if unet.config.in_channels != 4 or getattr(unet.config, "addition_embed_type", None) != (
        "text_time" if sdxl else None
    ):
        raise InvalidInputs(f"training supports the text-to-image UNets of {supported}")
    if sdxl and request is not None and request.train_text_encoder:
        raise InvalidInputs(
            "train_text_encoder: supported for Stable Diffusion 1.x/2.x; on SDXL the UNet trains alone",
            field="train_text_encoder",
        )
    vae = components["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return {
        "family": "sdxl" if sdxl else "sd",
        "pipe": model.pipelines.base,
        "unet": unet,
        "vae": vae,
        "text_encoder": components["text_encoder"],
        "tokenizer": components["tokenizer"],
        "scheduler_config": components["scheduler"].config,
        "default_resolution": unet.config.sample_size * scale,
        "multiple": scale * 2 ** (len(unet.config.block_out_channels) - 1),
    }


def _check_resolution(resolution: int, multiple: int) -> None:
    if resolution % multiple:
        raise InvalidInputs(f"resolution: {resolution} is not a multiple of {multiple}, as this model needs")


def _decode(values: list[str], field: str, settings: Settings) -> list[Image.Image]:
    limits = {"max_bytes": settings.max_body_bytes, "max_pixels": settings.max_image_pixels}
    return [imaging.decode_image(value, f"{field}[{index}]", **limits) for index, value in enumerate(values)]


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _generated_class_images(
    model: LoadedModel, request: TrainRequest, count: int, resolution: int, seed: int, cancel: threading.Event | None
) -> list[Image.Image]:
    """`count` images of the class prompt made by the model's txt2img pipeline at `resolution`, in calls of
    sample_batch_size, with the pipeline's default steps and guidance (the DreamBooth example's way)."""
    import torch

    if count <= 0:
        return []
    pipelines = model.pipelines
    scheduler = pipelines.scheduler(type(pipelines.base.scheduler).__name__)
    pipe: Any = pipelines.build(pipelines.resolve("txt2img"), scheduler, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    made: list[Image.Image] = []
    while len(made) < count:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"training cancelled while generating class images ({len(made)} of {count})", step=0)
        batch = min(request.sample_batch_size, count - len(made))
        generators = [torch.Generator("cpu").manual_seed(seed + len(made) + i) for i in range(batch)]
        with torch.inference_mode():
            output = pipe(
                prompt=request.class_prompt,
                num_images_per_prompt=batch,
                generator=generators,
                height=resolution,
                width=resolution,
            )
        made += output.images
    return made


def _fitted(image: Image.Image, resolution: int) -> Image.Image:
    """Scaled so that its shorter side is `resolution` (crops are taken from it at each step)."""
    from PIL import Image as PILImage

    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    return image.resize(size, PILImage.Resampling.BILINEAR)


def _trainable_unet(unet: Any, request: TrainRequest) -> Any:
    """A float32 copy of the model's UNet: with a LoRA on its attention (only the LoRA trains), or whole."""
    return _trainable(unet, request, LORA_TARGETS, lambda module, config: module.add_adapter(config))


def _trainable_text_encoder(encoder: Any, request: TrainRequest) -> Any:
    """A float32 copy of the model's text encoder: with a LoRA on its attention (q, k, v and out projections), or
    whole, as diffusers' example trains it beside the UNet."""
    from peft import inject_adapter_in_model

    # peft's own injection: transformers' `add_adapter` wants a newer peft than diffusers' LoRA code needs
    return _trainable(
        encoder, request, TEXT_LORA_TARGETS, lambda module, config: inject_adapter_in_model(config, module)
    )


def _trainable(module: Any, request: TrainRequest, targets: list[str], add_lora: Callable[[Any, Any], Any]) -> Any:
    """A float32 copy of `module` in training mode: frozen with a LoRA on `targets` (`add_lora(copy, config)`) for
    train_mode lora, else whole; with gradient checkpointing where asked (diffusers' and transformers' names)."""
    import torch

    trainable = copy.deepcopy(module).to(torch.float32)
    if request.train_mode == "lora":
        from peft import LoraConfig

        trainable.requires_grad_(False)
        config = LoraConfig(
            r=request.rank, lora_alpha=request.rank, init_lora_weights="gaussian", target_modules=targets
        )
        add_lora(trainable, config)
    else:
        trainable.requires_grad_(True)
    if request.gradient_checkpointing:
        enable = getattr(trainable, "enable_gradient_checkpointing", None) or trainable.gradient_checkpointing_enable
        enable()
    trainable.train()
    return trainable


def _loop(
    models: tuple[Any, Any],
    parts: dict[str, Any],
    data: tuple[list[Image.Image], list[Image.Image]],
    resolution: int,
    request: TrainRequest,
    seed: int,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> float:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    unet, encoder = models  # the text encoder: None when it is not trained
    device = next(unet.parameters()).device
    trained = [unet] if encoder is None else [unet, encoder]
    params = [param for module in trained for param in module.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=request.effective_learning_rate,
        betas=(request.adam_beta1, request.adam_beta2),
        weight_decay=request.adam_weight_decay,
        eps=request.adam_epsilon,
    )
    steps = request.max_train_steps
    schedule = get_scheduler(
        request.lr_scheduler,
        optimizer,
        num_warmup_steps=request.lr_warmup_steps,
        num_training_steps=steps,
        num_cycles=request.lr_num_cycles,
        power=request.lr_power,
    )
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler_config"])
    autocast, scaler = _mixed_precision(request, device)
    generator = torch.Generator("cpu").manual_seed(seed)
    crops = random.Random(seed)
    images, classes = data
    batch = request.train_batch_size
    prompts = [request.instance_prompt]
    if classes:  # each step's batch: the instance images, then as many class images with the class prompt
        assert request.class_prompt is not None
        prompts.append(request.class_prompt)
    ids = _prompt_ids(parts["tokenizer"], prompts)
    fixed, added = None, None
    if parts["family"] == "sdxl":  # both encoders, frozen, and SDXL's added conditions
        fixed, added = _sdxl_conditions(parts["pipe"], prompts, batch, resolution, device)
    elif encoder is None:  # the model's own encoder, frozen: its embeddings once
        fixed = torch.cat([_embeds(parts["text_encoder"], row, device).expand(batch, -1, -1) for row in ids])
    vae = _encoding_vae(parts["vae"])
    loss_value = 0.0
    for step in range(steps):
        loss_value = 0.0
        for _ in range(request.gradient_accumulation_steps):
            picked = [images[int(i)] for i in torch.randint(len(images), (batch,), generator=generator)]
            if classes:
                picked += [classes[int(i)] for i in torch.randint(len(classes), (batch,), generator=generator)]
            pixels = _pixels(picked, resolution, request.center_crop, crops).to(device)
            latents = _latents(vae, pixels, generator)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(
                noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
            ).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            with autocast:
                prompt = fixed
                if prompt is None:  # the text encoder trains: its embeddings at each step, with their gradients
                    prompt = encoder(ids.to(device))[0].float().repeat_interleave(batch, 0)
                predicted = unet(noisy, timesteps, prompt, added_cond_kwargs=added).sample
            loss = F.mse_loss(predicted[:batch].float(), target[:batch].float())
            if classes:
                prior = F.mse_loss(predicted[batch:].float(), target[batch:].float())
                loss = loss + request.prior_loss_weight * prior
            loss = loss / request.gradient_accumulation_steps
            scaler.scale(loss).backward()
            loss_value += float(loss.detach())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, request.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, steps)
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"training cancelled after step {step + 1} of {steps}", step=step + 1)
    for module in trained:
        module.eval()
        module.requires_grad_(False)
    return round(loss_value, 6)


def _mixed_precision(request: TrainRequest, device: Any) -> tuple[Any, Any]:
    """(autocast context, gradient scaler) for mixed_precision on CUDA; on a CPU training runs in float32."""
    import contextlib

    import torch

    chosen = request.mixed_precision or "fp16"
    if device.type != "cuda" or chosen == "no":
        return contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.float16 if chosen == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=chosen == "fp16")
    return torch.autocast("cuda", dtype=dtype), scaler


def _sdxl_conditions(pipe: Any, prompts: list[str], batch: int, resolution: int, device: Any) -> tuple[Any, Any]:
    """SDXL's prompt embeddings (both encoders', by the pipeline's own encode_prompt) and added conditions (the
    second encoder's pooled embedding; the size micro-conditions of a square crop at `resolution` from the
    top-left, as a pipeline asks for an image of that size), `batch` rows of each prompt."""
    import torch

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    rows = len(prompts) * batch
    added = {
        "text_embeds": pooled.to(device, torch.float32).repeat_interleave(batch, 0),
        "time_ids": time_ids.to(device).expand(rows, -1),
    }
    return embeds.to(device, torch.float32).repeat_interleave(batch, 0), added


def _encoding_vae(vae: Any) -> Any:
    """The VAE that encodes the training images: a float32 copy where the model's is half precision and its config
    says it must run in float32 (SDXL's `force_upcast`), else the model's own."""
    import torch

    if getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32:
        return copy.deepcopy(vae).to(torch.float32)
    return vae


def _prompt_ids(tokenizer: Any, prompts: list[str]) -> Any:
    """The prompts' token ids, one row each, padded to the tokenizer's length."""
    return tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def _embeds(encoder: Any, ids: Any, device: Any) -> Any:
    """A frozen encoder's embeddings of one prompt's ids, as float32 on `device`."""
    import torch

    with torch.no_grad():
        return encoder(ids[None].to(encoder.device))[0].to(device, torch.float32)


def _pixels(images: list[Image.Image], resolution: int, center: bool, crops: random.Random) -> Any:
    """A batch of crops as a float tensor in [-1, 1], NCHW."""
    import numpy as np
    import torch

    batch = []
    for image in images:
        left = (image.width - resolution) // 2 if center else crops.randint(0, image.width - resolution)
        top = (image.height - resolution) // 2 if center else crops.randint(0, image.height - resolution)
        crop = image.crop((left, top, left + resolution, top + resolution))
        batch.append(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def _latents(vae: Any, pixels: Any, generator: Any) -> Any:
    import torch

    with torch.no_grad():
        distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = distribution.sample(generator=generator) * vae.config.scaling_factor
    return latents.to(torch.float32)


def _save(unet: Any, encoder: Any, model: LoadedModel, request: TrainRequest, workdir: Path) -> Path:
    """The LoRA (the UNet's, and the text encoder's when it trained) as one file, or the model with its trained
    modules as a directory."""
    if request.train_mode == "lora":
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
        if encoder is not None:
            layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
        sdxl = model.pipelines.components.get("text_encoder_2") is not None
        saver: Any = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        saver.save_lora_weights(workdir, **layers, safe_serialization=True)
        return workdir / LORA_FILE
    base = model.pipelines.base
    unet.to(base.unet.dtype)
    trained = {"unet": unet}
    if encoder is not None:
        trained["text_encoder"] = encoder.to(base.text_encoder.dtype)
    pipe = type(base)(**(base.components | trained))
    pipe.save_pretrained(workdir, safe_serialization=True)
    return workdir


# --------------------------------------------------------------------------------------------- delivery


def deliver(
    trained: Trained, request: TrainRequest, settings: Settings, emit: Emit, timings: dict[str, float]
) -> TrainResult:
    """Upload the result to dest_url and/or keep it under its name; its `TrainResult`."""
    location = destination(request, settings)
    size = trained.path.stat().st_size if trained.mode == "lora" else archive.directory_bytes(trained.path)
    if location is not None:
        size = _upload(trained, location, settings, emit, timings)
    kept = request.trained_id
    if kept is not None:
        _keep(trained, request, settings)
    return TrainResult(
        train_mode=request.train_mode,
        steps=trained.steps,
        loss=trained.loss,
        model=kept if trained.mode == "full" else None,
        lora_weights=kept if trained.mode == "lora" else None,
        dest_url=request.dest_url,
        bytes=size,
        meta=trained.meta,
        timings=dict(timings),
    )


def _upload(trained: Trained, location: S3Location, settings: Settings, emit: Emit, timings: dict[str, float]) -> int:
    if trained.mode == "lora":
        emit("upload", "start")
        with phase(timings, "upload"):
            transfer.s3_upload(location, trained.path, disk.sha256_of(trained.path), settings)
        emit("upload", "done")
        return trained.path.stat().st_size
    with disk.temporary_file(settings.models_dir, Path(location.key).name) as packed:
        emit("compress", "start")
        with phase(timings, "compress"), packed.open("wb") as out:
            writer = disk.HashingWriter(out)
            archive.pack(trained.path, writer)
        emit("compress", "done")
        emit("upload", "start")
        with phase(timings, "upload"):
            transfer.s3_upload(location, packed, writer.digest.hexdigest(), settings)
        emit("upload", "done")
        return writer.size


def _keep(trained: Trained, request: TrainRequest, settings: Settings) -> None:
    target = _kept_path(request, settings)
    check_name_free(request, settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    if trained.mode == "full":
        disk.publish(trained.path, target)
    else:
        os.replace(trained.path, target)


def workdir(settings: Settings, job_id: str) -> Any:
    """A staging directory in MODELS_DIR for one training's output; removed at exit (unless published)."""
    return disk.staged_directory(settings.models_dir / f"train-{job_id}")
