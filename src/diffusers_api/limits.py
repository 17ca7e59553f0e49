"""Limits a request is held to before anything runs for it: how many images, prompt lengths, and the smallest
image a model makes.

The schema (schema/request.py) checks what is the same for every server; these checks need a setting (MAX_IMAGES,
MAX_PROMPT_CHARS) or the loaded model, so the runner makes them, before it fetches anything for the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import InvalidInputs

if TYPE_CHECKING:
    from PIL import Image

    from .pipelines import ModelPipelines
    from .schema import GenerateRequest


def check_images(request: GenerateRequest, max_images: int) -> None:
    """The request makes at most `max_images` images. A list of prompts has no bound of its own, and one request
    holds its slots of the batch until all its images are done: without this, a body of a few megabytes could
    ask for millions of images and hold the engine for days."""
    count = request.image_count
    if count > max_images:
        prompts = len(request.prompt) if isinstance(request.prompt, list) else 1
        raise InvalidInputs(
            f"this request makes {count} images ({prompts} prompt(s) x num_images_per_prompt "
            f"{request.num_images_per_prompt}), more than the {max_images} allowed (MAX_IMAGES)",
            field="prompt" if prompts > 1 else "num_images_per_prompt",
            limit=max_images,
            setting="MAX_IMAGES",
        )


def check_prompts(request: GenerateRequest, max_chars: int) -> None:
    """Every prompt and negative prompt (a list's each, SDXL's `prompt_2` ... among `extra` too) is at most
    `max_chars` long. diffusers tokenizes a prompt in full (only to warn about what CLIP's 77 tokens drop), on
    the engine's threads but holding the GIL: with two million characters, other threads stalled for over a
    second at a time and a concurrent request took 3.6 s instead of 0.1 s. The bound keeps that to milliseconds."""
    for field, value in _prompt_inputs(request).items():
        for where, text in _texts(field, value):
            if len(text) > max_chars:
                raise InvalidInputs(
                    f"{where}: {len(text)} characters, more than the {max_chars} allowed (MAX_PROMPT_CHARS)",
                    field=field,
                    limit=max_chars,
                    setting="MAX_PROMPT_CHARS",
                )


def check_prompt_lists(request: GenerateRequest) -> None:
    """A list among the other prompts (negative_prompt, SDXL's prompt_2 ... among `extra`) has one text per prompt.
    diffusers checks this for some pipelines only: PixArt's negative prompts, and SDXL's, SD3's and Flux's
    prompt_2 and prompt_3, failed concatenating their embeddings (a RuntimeError, a 500)."""
    if request.prompt is None:
        return  # the pipeline asks for one
    count = len(request.prompt) if isinstance(request.prompt, list) else 1
    for field, value in _prompt_inputs(request).items():
        if field != "prompt" and isinstance(value, list) and len(value) != count:
            raise InvalidInputs(
                f"{field}: {len(value)} given for {count} prompts; give one per prompt, or one string for all",
                field=field,
            )


def _prompt_inputs(request: GenerateRequest) -> dict[str, Any]:
    """The prompt and the other texts a request gives the pipeline: its negative prompt and `extra`'s prompts."""
    given = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    return given | {name: value for name, value in request.extra.items() if "prompt" in name}


def _texts(field: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(field, value)]
    if isinstance(value, list):
        return [(f"{field}[{index}]", text) for index, text in enumerate(value) if isinstance(text, str)]
    return []


def min_image_size(pipelines: ModelPipelines) -> tuple[int, str] | None:
    """The smallest width and height the model makes an image at, and how it follows from the model; None for a
    model without a UNet (a transformer's patches have other rules, which its pipeline checks itself).

    The VAE shrinks an image by its scale factor, and the UNet halves the latents at every down block that has
    a downsampler. Its deepest layer must still see 2x2 latent pixels: at 1x1, a group normalisation over a batch
    of one can see a single value per group, which PyTorch refuses ("Expected more than 1 value per channel
    when training"), and nothing of an image is left anyway."""
    unet, scale = pipelines.components.get("unet"), getattr(pipelines.base, "vae_scale_factor", None)
    if unet is None or not hasattr(unet, "down_blocks") or not isinstance(scale, int):
        return None
    downsampling = 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
    if type(pipelines.base).__name__ in _PIXEL_SPACE_INPUTS:
        return downsampling * 2, f"UNet downsampling {downsampling} x 2, for 2x2 pixels at its deepest"
    why = f"VAE scale factor {scale} x UNet downsampling {downsampling} x 2, for 2x2 latent pixels at its deepest"
    return scale * downsampling * 2, why


# Pipelines whose UNet sees the input image at its own size (concatenated with latents of that size), not
# through the VAE: their output is the VAE's scale factor larger than their input.
_PIXEL_SPACE_INPUTS = ("StableDiffusionUpscalePipeline",)


def check_size(request: GenerateRequest, pipelines: ModelPipelines, model_id: str) -> None:
    """The request's width and height are at least the model's smallest size."""
    for field in ("width", "height"):
        _check_side(field, "", getattr(request, field), pipelines, model_id)


def check_clip_skip(request: GenerateRequest, pipelines: ModelPipelines, model_id: str) -> None:
    """`clip_skip` (an `extra` argument) skips whole layers of the model's CLIP text encoders, at least one of whose
    layers must remain; diffusers indexes their hidden states with it unchecked (a 100 was an IndexError)."""
    value = request.extra.get("clip_skip")
    if value is None:
        return
    depths = []
    for name in ("text_encoder", "text_encoder_2"):
        layers = getattr(getattr(pipelines.components.get(name), "config", None), "num_hidden_layers", None)
        if isinstance(layers, int):
            depths.append(layers)
    if not depths:
        return  # no CLIP text encoder to skip layers of: the pipeline's own inputs check decides
    layers = min(depths)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < layers:
        raise InvalidInputs(
            f"clip_skip: {value!r} is not a whole number from 0 to {layers - 1} (the layers of {model_id}'s text "
            f"encoder that can be skipped: it has {layers})",
            field="clip_skip",
            maximum=layers - 1,
        )


def check_input_images(images: dict[str, Image.Image], pipelines: ModelPipelines, model_id: str) -> None:
    """An input image (img2img, inpainting) is at least the model's smallest size: it is denoised at its own."""
    image = images.get("image")
    if image is not None:
        _check_side("image", "its width ", image.width, pipelines, model_id)
        _check_side("image", "its height ", image.height, pipelines, model_id)


def _check_side(field: str, side: str, value: int | None, pipelines: ModelPipelines, model_id: str) -> None:
    smallest = min_image_size(pipelines)
    if value is None or smallest is None or value >= smallest[0]:
        return
    minimum, why = smallest
    raise InvalidInputs(
        f"{field}: {side}{value} is less than {minimum}, the smallest size {model_id} makes ({why})",
        field=field,
        minimum=minimum,
    )


def check_upscale_size(width: int, height: int, scale: float, max_pixels: int) -> tuple[int, int]:
    """The size an upscale of a `width` x `height` image by `scale` makes, if it is at most `max_pixels`
    (MAX_IMAGE_PIXELS bounds outputs as well as inputs: an upscaler's memory grows with its output)."""
    out_width, out_height = round(width * scale), round(height * scale)
    if out_width * out_height > max_pixels:
        largest = int((max_pixels / (scale * scale)) ** 0.5)
        raise InvalidInputs(
            f"image: {width}x{height} upscaled by {scale:g} would be {out_width}x{out_height} = "
            f"{out_width * out_height} pixels, more than the {max_pixels} allowed (MAX_IMAGE_PIXELS); at this scale "
            f"the input may have about {largest}x{largest} pixels",
            field="image",
            limit=max_pixels,
            setting="MAX_IMAGE_PIXELS",
        )
    return out_width, out_height
