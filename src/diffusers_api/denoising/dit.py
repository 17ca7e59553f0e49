"""The diffusion transformers (DiT) in our loop: SD3/SD3.5, Flux and PixArt-Sigma, prepared and decoded as their
pipelines do.

As for SD and SDXL (tasks.py), `prepare` runs what `__call__` does before its first step, with the pipeline's own
methods, and `vae_input` and `finish` what it does after its last, around the VAE's call (tasks.decode, which may
decode several requests in one call); the loop steps the task in between. What differs from a UNet:

- the model is a transformer, called with its inputs by name (forward.py's `eager_forward`);
- flow matching: the scheduler scales no model input, and its timesteps may be shifted by the image's size (`mu`);
- SD3 guides as SD does (unconditional and conditional rows), with pooled text embeddings as an added input;
- Flux is guidance-distilled: one row per image, the guidance scale an input of the model (dev; schnell takes
  none); its latents are packed 2x2 into tokens, with position ids for the image and text tokens that all rows
  of a forward share (`SharedInputs`), and its timestep goes to the model divided by 1000;
- PixArt-Sigma is not flow matching: DPM-Solver by default (any of the UNets' schedulers; the pipeline calls
  `scale_model_input` and reads `init_noise_sigma`, which FlowMatchEulerDiscreteScheduler lacks), guided as SD
  with T5 embeddings only, each row with its text's attention mask (`encoder_attention_mask`, an added input);
  its model predicts a learned sigma (twice the latent channels: the loop steps with the first half), and with
  `use_resolution_binning` (the default) it denoises at the closest of the model's aspect-ratio bins and
  resizes the decoded image to the size asked for. Txt2img only: diffusers has no PixArt img2img pipeline.

Left to diffusers' own call (`supports_transformer` says no): Flux's true CFG (true_cfg_scale > 1 with a negative
prompt: two forwards per step), and every argument outside tasks.py's `_SD3_ARGS` / `_FLUX_ARGS` (precomputed
embeddings, sigmas, mu, skip-layer guidance, joint_attention_kwargs, IP-Adapters), PixArt's `clean_caption=True`
(which needs bs4 and ftfy; ours encodes the prompt as given, as diffusers does without them) and PixArt models with
micro-conditions (PixArt-Alpha-like `use_additional_conditions`, which its Sigma pipeline does not give).
"""

from __future__ import annotations

from typing import Any

from .forward import SharedInputs
from .tasks import DenoiseTask, Encode, Family, Mode, batch_size, execution_device, find_first_step


def supports_transformer(pipe: Any, family: Family, kwargs: dict[str, Any]) -> bool:
    """Whether our loop reproduces `pipe(**kwargs)` (its arguments are already known to be ones it takes)."""
    if kwargs.get("output_type", "pil") != "pil":
        return False
    if family is Family.FLUX:
        true_cfg = (kwargs.get("true_cfg_scale") or 1.0) > 1
        return not (true_cfg and (kwargs.get("negative_prompt") is not None))
    if family is Family.PIXART:
        return not kwargs.get("clean_caption", False) and not pipe.transformer.use_additional_conditions
    return True


def prepare(pipe: Any, args: dict[str, Any], family: Family, mode: Mode, encode: Encode) -> DenoiseTask:
    """Everything `pipe(**args)` does before its first step (`args` has the pipeline's defaults filled in), its
    prompts encoded with `encode` (tasks.prepare's)."""
    if family is Family.PIXART:
        return _prepare_pixart(pipe, args, encode)
    args["height"] = args["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    args["width"] = args["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    if family is Family.SD3:
        return _prepare_sd3(pipe, args, mode, encode)
    return _prepare_flux(pipe, args, mode, encode)


def vae_input(pipe: Any, task: DenoiseTask) -> Any:
    """What the pipeline does to its latents after its last step, before the VAE: unpack them (Flux) and undo the
    VAE's scaling and shift (PixArt's VAE has no shift; its latents are cast to the VAE's dtype)."""
    latents, vae = task.latents, pipe.vae
    if task.family is Family.PIXART:
        return latents.to(vae.dtype) / vae.config.scaling_factor
    if task.family is Family.FLUX:
        assert task.size is not None
        height, width = task.size
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    return (latents / vae.config.scaling_factor) + vae.config.shift_factor


def finish(pipe: Any, task: DenoiseTask, image: Any) -> list[Any]:
    """What the pipeline does after the VAE: PixArt resizes and crops a binned resolution to the size asked for;
    then the images are post-processed."""
    if task.family is Family.PIXART and task.size is not None:
        height, width = task.size
        image = pipe.image_processor.resize_and_crop_tensor(image, width, height)
    images: list[Any] = pipe.image_processor.postprocess(image, output_type="pil")
    return images


# ---------------------------------------------------------------------------------------------- SD3


def _prepare_sd3(pipe: Any, args: dict[str, Any], mode: Mode, encode: Encode) -> DenoiseTask:
    import torch

    prompts = {name: args[name] for name in ("prompt", "prompt_2", "prompt_3")}
    negatives = {name: args[name] for name in ("negative_prompt", "negative_prompt_2", "negative_prompt_3")}
    size = (args["height"], args["width"])
    strength = [args["strength"]] if mode is Mode.IMG2IMG else []
    pipe.check_inputs(*prompts.values(), *size, *strength, **negatives, max_sequence_length=args["max_sequence_length"])
    pipe._guidance_scale, pipe._clip_skip = args["guidance_scale"], args["clip_skip"]
    pipe._joint_attention_kwargs, pipe._interrupt = None, False
    device, images = execution_device(pipe), batch_size(args["prompt"]) * args["num_images_per_prompt"]
    positive, negative, pooled, negative_pooled = encode(
        **prompts, **negatives, device=device, num_images_per_prompt=args["num_images_per_prompt"],
        do_classifier_free_guidance=pipe.do_classifier_free_guidance, clip_skip=pipe.clip_skip,
        max_sequence_length=args["max_sequence_length"],
    )  # fmt: skip
    if pipe.do_classifier_free_guidance:
        positive, pooled = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
    if mode is Mode.TXT2IMG:
        channels = pipe.transformer.config.in_channels
        latents = pipe.prepare_latents(images, channels, *size, positive.dtype, device, args["generator"])
        timesteps, _ = _sd3_timesteps(pipe, args, latents.shape[-2:], device)
    else:
        latent_size = (size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
        timesteps = _strength_tail(pipe, args, _sd3_timesteps(pipe, args, latent_size, device), device)
        image = pipe.image_processor.preprocess(args["image"], height=size[0], width=size[1])
        latents = pipe.prepare_latents(
            image, timesteps[:1].repeat(images), batch_size(args["prompt"]), args["num_images_per_prompt"],
            positive.dtype, device, args["generator"],
        )  # fmt: skip
    return _task(pipe, Family.SD3, timesteps, latents, positive, {"pooled_projections": pooled}, args)


def _sd3_timesteps(pipe: Any, args: dict[str, Any], latent_size: Any, device: Any) -> tuple[Any, int]:
    """(timesteps, steps): the schedule, shifted for the image's size where the scheduler asks for it
    (`use_dynamic_shifting`)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    config, patch = pipe.scheduler.config, pipe.transformer.config.patch_size
    shift = {}
    if config.get("use_dynamic_shifting", None):
        tokens = (int(latent_size[0]) // patch) * (int(latent_size[1]) // patch)
        shift["mu"] = calculate_shift(
            tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.16),
        )  # fmt: skip
    schedule: tuple[Any, int] = retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device, **shift)
    return schedule


def _strength_tail(pipe: Any, args: dict[str, Any], schedule: tuple[Any, int], device: Any) -> Any:
    """img2img: the tail of the schedule that `strength` denoises (the scheduler's begin index set to match)."""
    tail, steps = pipe.get_timesteps(schedule[1], args["strength"], device)
    if steps < 1:
        raise ValueError(f"strength {args['strength']} leaves {steps} denoising steps; at least one is needed")
    return tail


# ---------------------------------------------------------------------------------------------- Flux


def _prepare_flux(pipe: Any, args: dict[str, Any], mode: Mode, encode: Encode) -> DenoiseTask:
    import torch

    prompts = {name: args[name] for name in ("prompt", "prompt_2")}
    negatives = {name: args[name] for name in ("negative_prompt", "negative_prompt_2")}
    size = (args["height"], args["width"])
    strength = [args["strength"]] if mode is Mode.IMG2IMG else []
    pipe.check_inputs(*prompts.values(), *strength, *size, **negatives, max_sequence_length=args["max_sequence_length"])
    pipe._guidance_scale, pipe._joint_attention_kwargs = args["guidance_scale"], None
    pipe._current_timestep, pipe._interrupt = None, False
    init_image = None
    if mode is Mode.IMG2IMG:
        init_image = pipe.image_processor.preprocess(args["image"], height=size[0], width=size[1])
        init_image = init_image.to(dtype=torch.float32)
    device, images = execution_device(pipe), batch_size(args["prompt"]) * args["num_images_per_prompt"]
    hidden, pooled, text_ids = encode(
        **prompts, device=device, num_images_per_prompt=args["num_images_per_prompt"],
        max_sequence_length=args["max_sequence_length"],
    )  # fmt: skip
    channels = pipe.transformer.config.in_channels // 4
    if init_image is None:
        latents, image_ids = pipe.prepare_latents(images, channels, *size, hidden.dtype, device, args["generator"])
        timesteps, _ = _flux_timesteps(pipe, args, int(latents.shape[1]), device, sigmas_config=True)
        pipe.scheduler.set_begin_index(0)
    else:
        tokens = (int(size[0]) // pipe.vae_scale_factor // 2) * (int(size[1]) // pipe.vae_scale_factor // 2)
        timesteps = _strength_tail(pipe, args, _flux_timesteps(pipe, args, tokens, device), device)
        latents, image_ids = pipe.prepare_latents(
            init_image, timesteps[:1].repeat(images), images, channels, *size, hidden.dtype, device, args["generator"]
        )
    added = {"pooled_projections": pooled}
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([1], args["guidance_scale"], device=device, dtype=torch.float32)
        added["guidance"] = guidance.expand(images)
    # The position ids follow from the latent grid (image tokens) and the text's length (zeros): rows with the
    # same grid and text shape have the same ids.
    grid = (2 * (int(size[0]) // (pipe.vae_scale_factor * 2)), 2 * (int(size[1]) // (pipe.vae_scale_factor * 2)))
    shared = SharedInputs(key=("latent grid", *grid), tensors={"img_ids": image_ids, "txt_ids": text_ids})
    task = _task(pipe, Family.FLUX, timesteps, latents, hidden, added, args, shared)
    task.size = size
    return task


def _flux_timesteps(
    pipe: Any, args: dict[str, Any], tokens: int, device: Any, sigmas_config: bool = False
) -> tuple[Any, int]:
    """(timesteps, steps): Flux's schedule, sigmas from 1 to 1/steps shifted for the image's tokens. (The txt2img
    pipeline leaves the sigmas to a scheduler configured with `use_flow_sigmas`; img2img does not look.)"""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    steps, config = args["num_inference_steps"], pipe.scheduler.config
    sigmas: Any = np.linspace(1.0, 1 / steps, steps)
    if sigmas_config and getattr(config, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(
        tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15),
    )  # fmt: skip
    schedule: tuple[Any, int] = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    return schedule


# ---------------------------------------------------------------------------------------------- PixArt-Sigma

# The model's sample size -> the aspect-ratio bins its pipeline generates at (the module attribute's name).
_PIXART_BINS = {
    256: "ASPECT_RATIO_2048_BIN",
    128: "ASPECT_RATIO_1024_BIN",
    64: "ASPECT_RATIO_512_BIN",
    32: "ASPECT_RATIO_256_BIN",
}


def _prepare_pixart(pipe: Any, args: dict[str, Any], encode: Encode) -> DenoiseTask:
    import torch
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    config = pipe.transformer.config
    asked = (
        args["height"] or config.sample_size * pipe.vae_scale_factor,
        args["width"] or config.sample_size * pipe.vae_scale_factor,
    )
    size = asked
    if args["use_resolution_binning"]:
        if config.sample_size not in _PIXART_BINS:
            raise ValueError("Invalid sample size")  # the pipeline's words
        bins = getattr(sigma, _PIXART_BINS[config.sample_size])
        size = pipe.image_processor.classify_height_width_bin(*asked, ratios=bins)
    pipe.check_inputs(args["prompt"], *size, args["negative_prompt"], args["callback_steps"])
    length = args["max_sequence_length"]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        # (the pipeline checks none: a negative length fails deep in the tokenizer)
        raise ValueError(f"`max_sequence_length` has to be a positive integer, not {length!r}")
    guided = args["guidance_scale"] > 1.0
    device, images = execution_device(pipe), batch_size(args["prompt"]) * args["num_images_per_prompt"]
    positive, mask, negative, negative_mask = encode(
        prompt=args["prompt"], do_classifier_free_guidance=guided, negative_prompt=args["negative_prompt"],
        num_images_per_prompt=args["num_images_per_prompt"], device=device, clean_caption=False,
        max_sequence_length=args["max_sequence_length"],
    )  # fmt: skip
    if guided:
        positive, mask = torch.cat([negative, positive]), torch.cat([negative_mask, mask])
    timestep_device = "cpu" if sigma.XLA_AVAILABLE else device
    timesteps, _ = sigma.retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], timestep_device)
    channels = config.in_channels
    latents = pipe.prepare_latents(images, channels, *size, positive.dtype, device, args["generator"])
    task = _task(pipe, Family.PIXART, timesteps, latents, positive, {"encoder_attention_mask": mask}, args)
    task.guided = guided
    task.step_kwargs = pipe.prepare_extra_step_kwargs(args["generator"], args["eta"])
    task.learned_sigma = config.out_channels // 2 == channels
    task.size = asked if args["use_resolution_binning"] else None
    return task


# ---------------------------------------------------------------------------------------------- the task


def _task(
    pipe: Any,
    family: Family,
    timesteps: Any,
    latents: Any,
    hidden: Any,
    added: dict[str, Any],
    args: dict[str, Any],
    shared: SharedInputs | None = None,
) -> DenoiseTask:
    pipe._num_timesteps = len(timesteps)
    find_first_step(pipe.scheduler, timesteps)
    guided = family is Family.SD3 and bool(pipe.do_classifier_free_guidance)
    return DenoiseTask(
        model=pipe.transformer,
        family=family,
        scheduler=pipe.scheduler,
        timesteps=timesteps,
        latents=latents,
        hidden=hidden,
        guidance_scale=float(args["guidance_scale"]),
        guided=guided,
        added=added,
        shared=shared,
    )
