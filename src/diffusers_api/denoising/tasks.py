"""Our own denoising loop for the Stable Diffusion 1/2 and SDXL families, split into three phases.

diffusers' `__call__` keeps a request's whole state in local variables of one function, so two requests can
only share a UNet call by meeting inside it. Here the same work is split so that one thread can step many
requests at once:

- `prepare` (on the request's thread): check the inputs, encode the prompts, set the scheduler's timesteps,
  draw the initial latents (or encode the init image), exactly as the pipeline does, with its own methods.
  Requests that arrive while another encode runs encode their prompts in one call (denoising/encoding.py).
  The result is a `DenoiseTask`: everything the loop needs, as an object.
- the loop (`denoising/loop.py`, one thread for all requests): each step, the tasks of one model and shape run
  as one UNet forward; guidance is one tensor operation for all of them; then each task's own scheduler steps
  its own latents (schedulers keep per-request history, so this stays per task).
- `finish` (on the request's thread again): VAE decode, safety checker, post-processing, as the pipeline does.
  Requests whose last steps ran in the same round decode in one VAE call (denoising/decoding.py).

Supported here: `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`,
`StableDiffusionXLPipeline`, `StableDiffusionXLImg2ImgPipeline` and `StableDiffusionXLInpaintPipeline` (for both
inpainting pipelines: inpainting UNets with 9 input channels, and plain 4-channel ones that the pipeline blends
with the init image), and the diffusion transformers' `StableDiffusion3Pipeline`,
`StableDiffusion3Img2ImgPipeline`, `FluxPipeline`, `FluxImg2ImgPipeline` and `PixArtSigmaPipeline`
(denoising/dit.py), with the arguments in `_SUPPORTED`.
Anything else (other pipelines, cross_attention_kwargs, IP-Adapters, guidance-embedding UNets, denoising_start/end,
Flux's true CFG, SD3's skip-layer guidance, callbacks) keeps the generic diffusers path, which still batches its
UNet calls (not a transformer's) through the rendezvous.
"""

from __future__ import annotations

import enum
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..pipelines import call_parameters
from .forward import ForwardKey, SharedInputs

if TYPE_CHECKING:
    import torch

    from .decoding import DecodeGroup
    from .encoding import EncodeGroups

ProgressCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, steps)."""
Encode = Callable[..., Any]
"""A request's `pipe.encode_prompt`, called with keyword arguments (through its encode group, if any)."""


class Family(enum.Enum):
    """Which preparation and decoding a pipeline needs."""

    SD = "sd"  # Stable Diffusion 1.x / 2.x
    SDXL = "sdxl"
    SD3 = "sd3"  # Stable Diffusion 3 and 3.5
    FLUX = "flux"  # FLUX.1 dev and schnell
    PIXART = "pixart"  # PixArt-Sigma


class Mode(enum.Enum):
    """What a pipeline starts from: noise, an image, or an image and a mask."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


_SD_ARGS = {
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "guidance_rescale",
    "width",
    "height",
    "num_images_per_prompt",
    "eta",
    "clip_skip",
    "generator",
    "output_type",
    # prompts given as embeddings (prompts.py makes them for weighted and long prompts)
    "prompt_embeds",
    "negative_prompt_embeds",
}
_SDXL_ARGS = {
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "prompt_2",
    "negative_prompt_2",
    "original_size",
    "target_size",
    "crops_coords_top_left",
    "negative_original_size",
    "negative_target_size",
    "negative_crops_coords_top_left",
}
_IMG2IMG_ARGS = {"image", "strength"}
_SDXL_IMG2IMG_ARGS = {"aesthetic_score", "negative_aesthetic_score"}
_INPAINT_ARGS = {"image", "mask_image", "strength"}
_SD3_ARGS = {
    "prompt",
    "prompt_2",
    "prompt_3",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_3",
    "num_inference_steps",
    "guidance_scale",
    "width",
    "height",
    "num_images_per_prompt",
    "clip_skip",
    "max_sequence_length",
    "generator",
    "output_type",
}
# Flux's negative prompts only count with true CFG (true_cfg_scale > 1), which `supports` leaves to diffusers.
_FLUX_ARGS = {
    "prompt",
    "prompt_2",
    "negative_prompt",
    "negative_prompt_2",
    "true_cfg_scale",
    "num_inference_steps",
    "guidance_scale",
    "width",
    "height",
    "num_images_per_prompt",
    "max_sequence_length",
    "generator",
    "output_type",
}
# PixArt-Sigma: txt2img only (diffusers has no PixArt img2img pipeline). `clean_caption` is ours only when false
# (`supports`): cleaning needs bs4 and ftfy, and the loop encodes the prompt as given.
_PIXART_ARGS = {
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "width",
    "height",
    "num_images_per_prompt",
    "eta",
    "clean_caption",
    "use_resolution_binning",
    "max_sequence_length",
    "generator",
    "output_type",
}


@dataclass(frozen=True)
class _Supported:
    family: Family
    mode: Mode
    arguments: frozenset[str]  # the __call__ arguments this loop reproduces


def _supported(family: Family, mode: Mode, *arguments: set[str]) -> _Supported:
    return _Supported(family, mode, frozenset().union(*arguments))


# Pipeline class name -> what this loop does for it.
_SUPPORTED: dict[str, _Supported] = {
    "StableDiffusionPipeline": _supported(Family.SD, Mode.TXT2IMG, _SD_ARGS),
    "StableDiffusionImg2ImgPipeline": _supported(Family.SD, Mode.IMG2IMG, _SD_ARGS, _IMG2IMG_ARGS),
    "StableDiffusionInpaintPipeline": _supported(Family.SD, Mode.INPAINT, _SD_ARGS, _INPAINT_ARGS),
    "StableDiffusionXLPipeline": _supported(Family.SDXL, Mode.TXT2IMG, _SD_ARGS, _SDXL_ARGS),
    "StableDiffusionXLImg2ImgPipeline": _supported(
        Family.SDXL, Mode.IMG2IMG, _SD_ARGS, _SDXL_ARGS, _IMG2IMG_ARGS, _SDXL_IMG2IMG_ARGS
    ),
    "StableDiffusionXLInpaintPipeline": _supported(
        Family.SDXL, Mode.INPAINT, _SD_ARGS, _SDXL_ARGS, _INPAINT_ARGS, _SDXL_IMG2IMG_ARGS
    ),
    "StableDiffusion3Pipeline": _supported(Family.SD3, Mode.TXT2IMG, _SD3_ARGS),
    "StableDiffusion3Img2ImgPipeline": _supported(Family.SD3, Mode.IMG2IMG, _SD3_ARGS, _IMG2IMG_ARGS),
    "FluxPipeline": _supported(Family.FLUX, Mode.TXT2IMG, _FLUX_ARGS),
    "FluxImg2ImgPipeline": _supported(Family.FLUX, Mode.IMG2IMG, _FLUX_ARGS, _IMG2IMG_ARGS),
    "PixArtSigmaPipeline": _supported(Family.PIXART, Mode.TXT2IMG, _PIXART_ARGS),
}
_TRANSFORMERS = (Family.SD3, Family.FLUX, Family.PIXART)
_FLOW_MATCHING = (Family.SD3, Family.FLUX)  # their schedulers scale no model input


@dataclass(eq=False)
class DenoiseTask:
    """One request inside the loop: what diffusers' `__call__` keeps in local variables during its loop.

    Rows of `hidden` and `added` are in the pipeline's order: with guidance the first `images` rows are the
    unconditional ones and the next `images` the conditional ones, as in `torch.cat([latents] * 2)`."""

    model: Any  # the UNet or the diffusion transformer
    family: Family
    scheduler: Any
    timesteps: torch.Tensor
    latents: torch.Tensor  # (images, channels, height, width); Flux: packed, (images, tokens, channels)
    hidden: torch.Tensor  # encoder hidden states, (rows, tokens, dim)
    guidance_scale: float
    guided: bool  # classifier-free guidance: two model rows per image
    # The model's other inputs, rows like `hidden`: SDXL's text_embeds and time_ids; SD3's pooled_projections;
    # Flux's pooled_projections and guidance (guidance-distilled models take the scale as an input); PixArt's
    # encoder_attention_mask (each row's own text mask goes with its embeddings)
    added: dict[str, torch.Tensor] | None = None
    shared: SharedInputs | None = None  # Flux: the position ids of the image and text tokens
    # (height, width) of the image, where decoding needs it (Flux unpacks; PixArt resizes a binned resolution)
    size: tuple[int, int] | None = None
    # Learned sigma (PixArt): the model predicts noise and variance, 2x the channels; the scheduler steps with
    # the first half, as the pipeline does after guidance.
    learned_sigma: bool = False
    guidance_rescale: float = 0.0
    # Inpainting UNets (9 channels) also take the mask and the masked image's latents, rows like `hidden`.
    conditioning: torch.Tensor | None = None
    # Inpainting with a 4-channel UNet: after each step the unmasked area is reset to the noised init image.
    blend: Blend | None = None
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: ProgressCallback | None = None
    cancel: threading.Event | None = None
    step: int = 0
    error: BaseException | None = None
    pipe: Any = None  # the request's pipeline, whose VAE decodes the latents (set by `prepare`)
    # The tasks that decode with this one in one VAE call, attached by the loop before `done` is set (None: alone)
    decode_group: DecodeGroup | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def rows(self) -> int:
        """Rows of this task in a model forward: two per image with classifier-free guidance."""
        return self.images * (2 if self.guided else 1)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def finished(self) -> bool:
        return self.step >= self.steps

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step]

    def key(self) -> ForwardKey:
        """Tasks with equal keys can share a forward."""
        return ForwardKey.of(self.model, self.latents, self.hidden, self.added, self.shared)

    def model_input(self) -> torch.Tensor:
        """This step's model input for one copy of the latents (guided jobs use it for both of their halves). The
        flow-matching pipelines (SD3, Flux) give the latents as they are; PixArt's scales them as the UNets' do."""
        if self.family in _FLOW_MATCHING:
            return self.latents
        scaled: torch.Tensor = self.scheduler.scale_model_input(self.latents, self.timestep)
        return scaled

    def model_timestep(self) -> torch.Tensor:
        """This step's timestep once, as the model takes it (the loop repeats it per row): UNets embed it as a
        float32; SD3 takes the scheduler's as is (float32); Flux takes it divided by 1000 in the latents' dtype.
        PixArt's pipeline gives the scheduler's as is (DPM-Solver's are integers), but its model embeds it as a
        float32 as the UNets do, so it takes a float32 too: rows of integer and float schedules then batch alike,
        and a CUDA graph's static timesteps are never integers that a later float would be truncated into."""
        import torch

        t = self.timestep.reshape(1)
        if self.family is Family.FLUX:
            scaled: torch.Tensor = t.to(self.latents.dtype) / 1000
            return scaled
        return t.to(device=self.latents.device, dtype=torch.float32)

    def advance(self, noise: torch.Tensor, text_noise: torch.Tensor | None) -> None:
        """Apply the scheduler step to the guided noise prediction and move to the next timestep."""
        if text_noise is not None and self.guidance_rescale > 0.0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            noise = rescale_noise_cfg(noise, text_noise, guidance_rescale=self.guidance_rescale)
        if self.learned_sigma:
            noise = noise.chunk(2, dim=1)[0]
        t = self.timestep
        self.latents = self.scheduler.step(noise, t, self.latents, **self.step_kwargs, return_dict=False)[0]
        if self.blend is not None:
            self.latents = self.blend.apply(self)
        self.step += 1


@dataclass
class Blend:
    """What StableDiffusionInpaintPipeline does after each step when its UNet has 4 input channels."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor  # the mask of one copy of the images (the unconditional half with guidance)

    def apply(self, task: DenoiseTask) -> torch.Tensor:
        import torch

        proper = self.image_latents
        if task.step < task.steps - 1:
            proper = task.scheduler.add_noise(proper, self.noise, torch.tensor([task.timesteps[task.step + 1]]))
        return (1 - self.mask) * proper + self.mask * task.latents


# ---------------------------------------------------------------------------------------------- eligibility


def supports(pipe: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this loop reproduces `pipe(**kwargs)`; otherwise the generic diffusers path runs it."""
    entry = _SUPPORTED.get(type(pipe).__name__)
    if entry is None or not set(kwargs) <= entry.arguments:
        return False
    if entry.family in _TRANSFORMERS:
        from .dit import supports_transformer

        return supports_transformer(pipe, entry.family, kwargs)
    if type(pipe.vae).__name__ == "AsymmetricAutoencoderKL":
        return False  # its decoder also takes the init image and mask
    unet = pipe.unet
    if unet.config.time_cond_proj_dim is not None or getattr(unet, "encoder_hid_proj", None) is not None:
        return False  # guidance-embedding (LCM-distilled) and IP-Adapter UNets take inputs this loop does not make
    return kwargs.get("output_type", "pil") == "pil"


def _arguments(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` completed with the pipeline's own defaults, as `pipe(**kwargs)` would see them."""
    parameters = call_parameters(type(pipe))
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return defaults | kwargs


# diffusers' `_execution_device` walks every submodule of every component, looking for offloading hooks, a few
# times per call: 8.4 ms for SD2.1-base (1,235 modules) on a CI core, with the GIL held, and each request read it
# twice. A loaded model's components do not move, so the device is read once per model (its UNet or transformer).
_EXECUTION_DEVICES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_EXECUTION_DEVICES_LOCK = threading.Lock()


def execution_device(pipe: Any) -> Any:
    """`pipe._execution_device`, read once per model."""
    model = denoising_model(pipe)
    with _EXECUTION_DEVICES_LOCK:
        if model not in _EXECUTION_DEVICES:
            _EXECUTION_DEVICES[model] = pipe._execution_device
        return _EXECUTION_DEVICES[model]


def denoising_model(pipe: Any) -> Any:
    """The pipeline's UNet, or its diffusion transformer."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


# ---------------------------------------------------------------------------------------------- prepare


def prepare(
    pipe: Any, kwargs: dict[str, Any], encodes: EncodeGroups | None = None, cancel: threading.Event | None = None
) -> DenoiseTask:
    """Everything `pipe(**kwargs)` does before its first step, its prompts encoded through `encodes` (with the
    requests arriving together; None: alone). Raises ValueError/TypeError as the pipeline does, and Cancelled
    when `cancel` is set while its encode waits."""
    import torch

    entry = _SUPPORTED[type(pipe).__name__]
    args = _arguments(pipe, kwargs)
    encode = pipe.encode_prompt if encodes is None else encodes.encoder(pipe, entry.family, cancel)
    with torch.inference_mode():
        if entry.family is Family.SD:
            task = _prepare_sd(pipe, args, entry.mode, encode)
        elif entry.family is Family.SDXL:
            task = _prepare_sdxl(pipe, args, entry.mode, encode)
        else:
            from . import dit

            task = dit.prepare(pipe, args, entry.family, entry.mode, encode)
    task.pipe = pipe
    return task


def _start(pipe: Any, args: dict[str, Any]) -> None:
    """The per-call flags the pipeline's properties read (do_classifier_free_guidance, clip_skip, ...)."""
    pipe._guidance_scale = args["guidance_scale"]
    pipe._guidance_rescale = args.get("guidance_rescale", 0.0)
    pipe._clip_skip = args["clip_skip"]
    pipe._cross_attention_kwargs = None
    pipe._interrupt = False
    pipe._denoising_end = None
    pipe._denoising_start = None


def batch_size(prompt: Any) -> int:
    return 1 if isinstance(prompt, str) else len(prompt)


def _prompts(args: dict[str, Any]) -> int:
    """How many prompts the call has: as text, or as embeddings (a row each), as the pipelines count them."""
    if args["prompt"] is None and args.get("prompt_embeds") is not None:
        return int(args["prompt_embeds"].shape[0])
    return batch_size(args["prompt"])


def _prepare_sd(pipe: Any, args: dict[str, Any], mode: Mode, encode: Encode) -> DenoiseTask:
    import torch

    if mode in (Mode.TXT2IMG, Mode.INPAINT):
        args["height"] = args["height"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
        args["width"] = args["width"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    embeds = {name: args[name] for name in ("prompt_embeds", "negative_prompt_embeds")}
    if mode is Mode.TXT2IMG:
        pipe.check_inputs(args["prompt"], args["height"], args["width"], None, args["negative_prompt"], **embeds)
    elif mode is Mode.INPAINT:
        pipe.check_inputs(
            args["prompt"], args["image"], args["mask_image"], args["height"], args["width"], args["strength"], None,
            args["output_type"], args["negative_prompt"], **embeds,
        )  # fmt: skip
    else:
        pipe.check_inputs(args["prompt"], args["strength"], None, args["negative_prompt"], **embeds)
    _start(pipe, args)
    device, images = execution_device(pipe), _prompts(args) * args["num_images_per_prompt"]
    positive, negative = encode(
        prompt=args["prompt"],
        device=device,
        num_images_per_prompt=args["num_images_per_prompt"],
        do_classifier_free_guidance=pipe.do_classifier_free_guidance,
        negative_prompt=args["negative_prompt"],
        clip_skip=pipe.clip_skip,
        **embeds,
    )
    hidden = torch.cat([negative, positive]) if pipe.do_classifier_free_guidance else positive
    return _initial_latents(pipe, args, mode, images, hidden.dtype, device).task(pipe, args, hidden, added=None)


@dataclass
class _Latents:
    """What the pipelines prepare before their loop, besides the prompts (SD and SDXL alike)."""

    timesteps: Any
    latents: Any
    conditioning: Any = None  # 9-channel inpainting UNets: mask and masked-image latents, rows like `hidden`
    blend: Blend | None = None  # 4-channel UNets inpainting: the init image the unmasked area is reset to

    def task(self, pipe: Any, args: dict[str, Any], hidden: Any, added: Any) -> DenoiseTask:
        pipe._num_timesteps = len(self.timesteps)
        find_first_step(pipe.scheduler, self.timesteps)
        return DenoiseTask(
            model=pipe.unet,
            family=_SUPPORTED[type(pipe).__name__].family,
            scheduler=pipe.scheduler,
            timesteps=self.timesteps,
            latents=self.latents,
            hidden=hidden,
            added=added,
            guidance_scale=float(args["guidance_scale"]),
            guided=bool(pipe.do_classifier_free_guidance),
            guidance_rescale=float(args.get("guidance_rescale") or 0.0),
            conditioning=self.conditioning,
            blend=self.blend,
            step_kwargs=pipe.prepare_extra_step_kwargs(args["generator"], args["eta"]),
        )


def _inpaint_latents(pipe: Any, args: dict[str, Any], images: int, dtype: Any, device: Any) -> _Latents:
    """The inpainting pipelines' timesteps, init image, noise, mask and masked image (steps 4 to 7 of SDXL's)."""
    import torch

    height, width, generator = args["height"], args["width"], args["generator"]
    timesteps, steps = _timesteps(pipe, args, Mode.INPAINT, device)
    if steps < 1:
        raise ValueError(f"strength {args['strength']} leaves {steps} denoising steps; at least one is needed")
    init_image = pipe.image_processor.preprocess(args["image"], height=height, width=width).to(dtype=torch.float32)
    unet_channels = pipe.unet.config.in_channels
    if unet_channels not in (4, 9):
        raise ValueError(f"an inpainting UNet takes 4 or 9 input channels, not {unet_channels}")
    outputs = pipe.prepare_latents(
        images, pipe.vae.config.latent_channels, height, width, dtype, device, generator,
        image=init_image, timestep=timesteps[:1].repeat(images), is_strength_max=args["strength"] == 1.0,
        return_noise=True, return_image_latents=unet_channels == 4,
    )  # fmt: skip
    latents, noise = outputs[0], outputs[1]
    condition = pipe.mask_processor.preprocess(args["mask_image"], height=height, width=width)
    mask, masked_latents = pipe.prepare_mask_latents(
        condition, init_image * (condition < 0.5), images, height, width, dtype, device, generator,
        pipe.do_classifier_free_guidance,
    )  # fmt: skip
    if unet_channels == 9:
        return _Latents(timesteps, latents, conditioning=torch.cat([mask, masked_latents], dim=1))
    return _Latents(timesteps, latents, blend=Blend(image_latents=outputs[2], noise=noise, mask=mask[:images]))


def _prepare_sdxl(pipe: Any, args: dict[str, Any], mode: Mode, encode: Encode) -> DenoiseTask:
    import torch

    embeds = {name: args[name] for name in ("prompt_embeds", "negative_prompt_embeds")}
    pooled_embeds = {name: args[name] for name in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
    if mode is Mode.TXT2IMG:
        args["height"] = args["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        args["width"] = args["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            args["prompt"], args["prompt_2"], args["height"], args["width"], None, args["negative_prompt"],
            args["negative_prompt_2"], **embeds, **pooled_embeds,
        )  # fmt: skip
    elif mode is Mode.INPAINT:
        args["height"] = args["height"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
        args["width"] = args["width"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            args["prompt"], args["prompt_2"], args["image"], args["mask_image"], args["height"], args["width"],
            args["strength"], None, args["output_type"], args["negative_prompt"], args["negative_prompt_2"], **embeds,
        )  # fmt: skip
    else:
        pipe.check_inputs(
            args["prompt"], args["prompt_2"], args["strength"], args["num_inference_steps"], None,
            args["negative_prompt"], args["negative_prompt_2"], **embeds,
        )  # fmt: skip
    _start(pipe, args)
    device, images = execution_device(pipe), _prompts(args) * args["num_images_per_prompt"]
    positive, negative, pooled, negative_pooled = encode(
        prompt=args["prompt"],
        prompt_2=args["prompt_2"],
        device=device,
        num_images_per_prompt=args["num_images_per_prompt"],
        do_classifier_free_guidance=pipe.do_classifier_free_guidance,
        negative_prompt=args["negative_prompt"],
        negative_prompt_2=args["negative_prompt_2"],
        clip_skip=pipe.clip_skip,
        **embeds,
        **pooled_embeds,
    )
    with _vae_for_encoding(pipe):
        prepared = _initial_latents(pipe, args, mode, images, positive.dtype, device)
    if mode is Mode.TXT2IMG and hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    height, width = (size * pipe.vae_scale_factor for size in prepared.latents.shape[-2:])
    time_ids, negative_time_ids = _sdxl_time_ids(pipe, args, mode, (height, width), positive.dtype, pooled)
    if pipe.do_classifier_free_guidance:
        positive = torch.cat([negative, positive])
        pooled = torch.cat([negative_pooled, pooled])
        time_ids = torch.cat([negative_time_ids, time_ids])
    # The pipelines repeat the time ids per image after (txt2img) or before (img2img) pairing them with the
    # negative ones; the row order decides which UNet row gets which ids, so it is kept as theirs.
    if mode is Mode.TXT2IMG:
        time_ids = time_ids.repeat(images, 1)
    added = {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device)}
    return prepared.task(pipe, args, positive.to(device), added)


def _sdxl_time_ids(
    pipe: Any, args: dict[str, Any], mode: Mode, size: tuple[int, int], dtype: Any, pooled: Any
) -> tuple[Any, Any]:
    """(time ids, negative time ids) of SDXL's micro-conditioning, as each pipeline computes them."""
    original_size = args["original_size"] or size
    target_size = args["target_size"] or size
    encoder_2 = pipe.text_encoder_2
    projection_dim = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
    crops = args["crops_coords_top_left"]
    if mode is Mode.TXT2IMG:
        time_ids = pipe._get_add_time_ids(
            original_size, crops, target_size, dtype=dtype, text_encoder_projection_dim=projection_dim
        )
        negative = time_ids
        if args["negative_original_size"] is not None and args["negative_target_size"] is not None:
            negative = pipe._get_add_time_ids(
                args["negative_original_size"], args["negative_crops_coords_top_left"], args["negative_target_size"],
                dtype=dtype, text_encoder_projection_dim=projection_dim,
            )  # fmt: skip
        return time_ids, negative
    images = _prompts(args) * args["num_images_per_prompt"]
    time_ids, negative = pipe._get_add_time_ids(
        original_size, crops, target_size, args["aesthetic_score"], args["negative_aesthetic_score"],
        args["negative_original_size"] or original_size, args["negative_crops_coords_top_left"],
        args["negative_target_size"] or target_size, dtype=dtype, text_encoder_projection_dim=projection_dim,
    )  # fmt: skip
    return time_ids.repeat(images, 1), negative.repeat(images, 1)


def _timesteps(pipe: Any, args: dict[str, Any], mode: Mode, device: Any) -> tuple[Any, int]:
    """(timesteps, steps) as the pipeline sets them: the whole schedule for txt2img; with a strength (img2img,
    inpainting), the tail of it that is denoised, the scheduler's begin index set to match."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    timesteps, steps = retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device)
    if mode is Mode.TXT2IMG:
        return timesteps, steps
    tail: tuple[Any, int] = pipe.get_timesteps(steps, args["strength"], device)
    return tail


def _initial_latents(pipe: Any, args: dict[str, Any], mode: Mode, images: int, dtype: Any, device: Any) -> _Latents:
    """Pure noise for txt2img; the noised init image for img2img; that and the mask for inpainting."""
    if mode is Mode.INPAINT:
        return _inpaint_latents(pipe, args, images, dtype, device)
    timesteps, _ = _timesteps(pipe, args, mode, device)
    generator = args["generator"]
    if mode is Mode.TXT2IMG:
        channels = pipe.unet.config.in_channels
        height, width = args["height"], args["width"]
        return _Latents(timesteps, pipe.prepare_latents(images, channels, height, width, dtype, device, generator))
    image = pipe.image_processor.preprocess(args["image"])
    start = timesteps[:1].repeat(images)
    batch = _prompts(args)
    latents = pipe.prepare_latents(image, start, batch, args["num_images_per_prompt"], dtype, device, generator)
    return _Latents(timesteps, latents)


def find_first_step(scheduler: Any, timesteps: Any) -> None:
    """The step index a scheduler would look up at its first step, looked up here on the request's thread.

    Schedulers without a begin index (the SD txt2img pipeline sets none) find their first index by searching their
    timesteps for the first one, and reading the result is a device sync. In the loop that would make its thread
    wait for all the work queued on the device, whenever a request joins. Setting the begin index to the same
    value makes the first step take it as is, so the steps are the same."""
    if getattr(scheduler, "begin_index", 0) is not None or not hasattr(scheduler, "index_for_timestep"):
        return
    scheduler.set_begin_index(int(scheduler.index_for_timestep(timesteps[0])))


# ---------------------------------------------------------------------------------------------- finish


@dataclass
class Output:
    """What the runner reads from a pipeline's output."""

    images: list[Any]
    nsfw_content_detected: list[bool] | None = None


def finish(pipe: Any, task: DenoiseTask, kwargs: dict[str, Any]) -> Output:
    """Everything `pipe(**kwargs)` does after its last step: decode, safety check, post-process."""
    import torch

    family = _SUPPORTED[type(pipe).__name__].family
    with torch.inference_mode():
        if family is Family.SD:
            return _finish_sd(pipe, task, kwargs.get("generator"))
        if family is Family.SDXL:
            return _finish_sdxl(pipe, task)
        from . import dit

        return Output(dit.finish(pipe, task, decode(pipe, task)))


def decode(pipe: Any, task: DenoiseTask, **options: Any) -> torch.Tensor:
    """The VAE's output for `task`'s latents: its rows of its decode group's one call, else a call of its own
    (with `options`: SD's pipelines pass their generator, which the VAEs that decode in groups do not use)."""
    if task.decode_group is not None:
        image = task.decode_group.images_of(task)
        if image is not None:
            return image
    vae, latents = vae_input(pipe, task)
    decoded: torch.Tensor = vae.decode(latents, return_dict=False, **options)[0]
    return decoded


def vae_input(pipe: Any, task: DenoiseTask) -> tuple[Any, torch.Tensor]:
    """(the VAE that decodes `task`'s latents, its input): the family's own unpacking, scaling and shift, per task.
    SDXL's fp16 VAE decodes with its float32 copy, from float32 latents."""
    vae = pipe.vae
    if task.family is Family.SD:
        return vae, task.latents / vae.config.scaling_factor
    if task.family is Family.SDXL:
        latents = task.latents
        if _needs_upcast(vae):
            vae = float32_vae(vae)
            latents = latents.float()
        return vae, _sdxl_vae_input(vae, latents)
    from . import dit

    return vae, dit.vae_input(pipe, task)


def _finish_sd(pipe: Any, task: DenoiseTask, generator: Any) -> Output:
    image = decode(pipe, task, generator=generator)
    image, nsfw = pipe.run_safety_checker(image, execution_device(pipe), task.hidden.dtype)
    denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
    return Output(pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize), nsfw)


def _finish_sdxl(pipe: Any, task: DenoiseTask) -> Output:
    image = decode(pipe, task)
    if pipe.watermark is not None:
        image = pipe.watermark.apply_watermark(image)
    return Output(pipe.image_processor.postprocess(image, output_type="pil"))


def _sdxl_vae_input(vae: Any, latents: Any) -> Any:
    """SDXL's latents undone: with the VAE's latents_mean and latents_std where it has them, else its scaling."""
    import torch

    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        return latents * std / vae.config.scaling_factor + mean
    return latents / vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------- fp16 SDXL VAE

# SDXL's VAE overflows in float16, so its config asks for `force_upcast` and the SDXL pipelines cast the *shared*
# VAE to float32 around each encode and decode, then back. With concurrent requests one request's cast pulls
# the dtype from under another's decode. Instead, each such VAE gets one float32 copy, made once and never cast:
# the same float32 arithmetic as the pipeline's, without touching the shared module.
_FLOAT32_VAES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_FLOAT32_LOCK = threading.Lock()


def _needs_upcast(vae: Any) -> bool:
    import torch

    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def float32_vae(vae: Any) -> Any:
    import copy

    import torch

    with _FLOAT32_LOCK:
        if vae not in _FLOAT32_VAES:
            _FLOAT32_VAES[vae] = _PinnedDtype(copy.deepcopy(vae).to(dtype=torch.float32))
        return _FLOAT32_VAES[vae]


class _PinnedDtype:
    """A module whose `.to(...)` is a no-op: the pipelines' own casts cannot change the float32 copy."""

    def __init__(self, module: Any) -> None:
        self.__dict__["module"] = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def to(self, *args: Any, **kwargs: Any) -> _PinnedDtype:
        return self


@contextmanager
def _vae_for_encoding(pipe: Any) -> Iterator[None]:
    """SDXL img2img and inpainting encode the init image (and the masked image) with the VAE, upcasting it like
    the decode: use the float32 copy.
    `pipe` is this request's own pipeline object, so swapping its attribute affects no one else."""
    vae = pipe.vae
    if not _needs_upcast(vae):
        yield
        return
    object.__setattr__(pipe, "vae", float32_vae(vae))
    try:
        yield
    finally:
        object.__setattr__(pipe, "vae", vae)
