"""One request, from validated input to images + meta + timings. No HTTP or RunPod imports here.

The runner is synchronous and runs on the engine's worker thread. It never lets an exception escape as
anything but a `DiffusersAPIError`, so every transport can turn failures into the same wire errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING, Any

from . import imaging, prompts
from .denoising.tasks import ProgressCallback
from .devices import memory_usage
from .errors import Cancelled, DiffusersAPIError, InvalidInputs, NotReady, PipelineError
from .limits import (
    check_clip_skip,
    check_images,
    check_input_images,
    check_prompt_lists,
    check_prompts,
    check_size,
)
from .models.controls import control_arguments, control_modules, control_pipeline
from .models.ip_adapter import check_family as check_ip_adapter_family
from .models.store import LoadedModel, ModelStore
from .pipelines import call_arguments, call_parameters
from .schema import RESERVED_CALL_ARGS, AnyRequest, GenerateRequest, GenerateResult, UpscaleRequest, is_http_url
from .schema.request import LPW_PIPELINE
from .upscaling import Upscalers

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from PIL import Image

    from .config import Settings
    from .denoising import SharedSteps
    from .schema import IPAdapter

log = logging.getLogger(__name__)

# Request fields that are pipeline __call__ arguments of the same name.
CALL_FIELDS = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "width",
    "height",
    "num_images_per_prompt",
    "strength",
    "eta",
    "cross_attention_kwargs",
)


@cache
def versions() -> dict[str, str]:
    names = ("diffusers-api", "diffusers", "torch", "transformers")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


class Timings(dict[str, float]):
    """Milliseconds per phase."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + (time.perf_counter() - started) * 1000, 2)


class Runner:
    """Turns a GenerateRequest into a GenerateResult on the configured device."""

    def __init__(self, settings: Settings, store: ModelStore | None = None, steps: SharedSteps | None = None) -> None:
        """With `steps`, concurrent requests share their denoising steps (the batching engine gives it); without,
        each request runs diffusers' own call alone."""
        self.settings = settings
        self.store = store or ModelStore(settings)
        self.steps = steps
        self._init_ms: float | None = None
        self.upscalers = Upscalers(settings)  # loads nothing until an upscale asks

    def start(self) -> None:
        """Load the configured model. Called once, before the first request, off the event loop."""
        started = time.perf_counter()
        self.store.load_default()
        self._init_ms = round((time.perf_counter() - started) * 1000, 2)

    def run(
        self,
        request: AnyRequest,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerateResult:
        try:
            if isinstance(request, UpscaleRequest):
                return self._upscale(request)
            return self._run(request, progress, cancel)
        except DiffusersAPIError:
            raise
        except Exception as exc:
            log.exception("request failed")
            raise PipelineError(f"{type(exc).__name__}: {exc}") from exc

    def _upscale(self, request: UpscaleRequest) -> GenerateResult:
        """An upscale (upscaling.py), on this same thread and under the same admission as a generation."""
        return self.upscalers.run(request, self._new_timings())

    def _new_timings(self) -> Timings:
        """A request's timings: with `init`, the model's load at start, on the first request after it."""
        timings = Timings()
        if self._init_ms is not None:
            timings["init"], self._init_ms = self._init_ms, None
        return timings

    def _run(
        self, request: GenerateRequest, progress: ProgressCallback | None, cancel: threading.Event | None
    ) -> GenerateResult:
        timings = self._new_timings()
        request = self._server_pipeline_options(request)
        pipe_cls, scheduler = self._check_before_fetching(request, timings)
        with_ip = request.ip_adapter is not None
        control_cls = control_pipeline(pipe_cls, request.controlnet, with_ip) if request.controlnet else None
        # The store reports its own phases: loadModel, and download / upload when it had to fetch the model.
        model = self.store.get(request, timings)
        extra = self._control_modules(request, model, control_cls, timings)
        fill = self._fill_mode(request) if _inpaints(pipe_cls) else "none"
        inputs = self._decode_inputs(request, timings, fill)
        check_input_images(inputs, model.pipelines, model.spec.model_id)
        pipelines, ip_adapter = model.pipelines, None
        scaled: AbstractContextManager[None] = nullcontext()
        if request.ip_adapter is not None:  # models/ip_adapter.py: a variant of the model, never the model itself
            ip_images = self._decode_ip_images(request.ip_adapter, timings)
            ip_adapter = self.store.ip_adapter(model, request.ip_adapter, timings)
            pipelines, scaled = ip_adapter.pipelines, ip_adapter.scaled(request.ip_adapter.scale)
        pipe_cls = control_cls or pipe_cls
        pipe = pipelines.build(pipe_cls, scheduler, safety_checker=request.safety_checker, extra=extra)
        seeds = imaging.image_seeds(request.seed, request.image_count)
        kwargs = self._call_kwargs(request, inputs, seeds)
        if request.prompt_weighting or request.long_prompts:
            with timings.phase("prompts"):
                kwargs = prompts.encode(pipe, kwargs, request.prompt_weighting, request.long_prompts)
        if ip_adapter is not None:
            kwargs["ip_adapter_image"] = [ip_images]  # one IP-Adapter: its list of images
        if request.controlnet:
            images = self._control_images(request, model, timings)
            kwargs = control_arguments(pipe_cls, request.controlnet, images, kwargs)
        check_steps_left(pipe, kwargs)
        loop = self._loop(pipe, kwargs)
        with timings.phase("inference"), scaled:
            output = self._call(pipe, kwargs, progress, cancel, loop)
        with timings.phase("encode"):
            encoded = [imaging.encode_image(img, request.image_format, request.image_quality) for img in output.images]
        nsfw = getattr(output, "nsfw_content_detected", None)
        meta = self._meta(model, pipe_cls, scheduler, request, seeds)
        meta["LOOP"] = loop
        if request.controlnet:
            meta["CONTROLNET"] = [
                control.model_dump(exclude={"image"}, exclude_none=True) for control in request.controlnet
            ]
        meta |= {"FILL_MODE": fill} if fill != "none" else {}
        if ip_adapter is not None and request.ip_adapter is not None:
            meta["IP_ADAPTER"] = {"model": ip_adapter.spec.describe(), "scale": request.ip_adapter.scale}
        return GenerateResult(
            images=encoded,
            image_format=request.image_format,
            seeds=seeds,
            nsfw=[bool(flag) for flag in nsfw] if nsfw is not None else None,
            meta=meta,
            timings=dict(timings),
            mem_usage=memory_usage(model.device),
        )

    # --- inputs ----------------------------------------------------------------------------------------------

    def _check_before_fetching(self, request: GenerateRequest, timings: Timings) -> tuple[Any, SchedulerMixin]:
        """What needs no network, checked against the model before the request's LoRAs, embeddings or image URLs
        are fetched: its prompts' lengths, its size, its pipeline, its scheduler and the names of its inputs. A
        request that cannot run downloads nothing. Returns the pipeline class and the scheduler, which the request
        then runs with (adapters change neither the pipeline classes nor the schedulers a model takes)."""
        check_images(request, self.settings.max_images)
        imaging.check_encodable(request.image_format)
        check_prompts(request, self.settings.max_prompt_chars)
        check_prompt_lists(request)
        self._check_pixels(request)
        model = self.store.get(request.model_copy(update={"lora_weights": None, "textual_inversions": None}), timings)
        check_size(request, model.pipelines, model.spec.model_id)
        pipe_cls = self._pipeline_class(model, request)
        scheduler = model.pipelines.scheduler(self._scheduler_name(model, request))
        self._check_input_names(pipe_cls, _input_names(request))
        check_clip_skip(request, model.pipelines, model.spec.model_id)
        if request.prompt_weighting or request.long_prompts:
            prompts.check_request(request, pipe_cls, model.spec.model_id)
        if request.ip_adapter is not None:
            check_ip_adapter_family(pipe_cls)
        return pipe_cls, scheduler

    def _check_input_names(self, pipe_cls: Any, names: set[str]) -> None:
        accepted = call_arguments(pipe_cls) - RESERVED_CALL_ARGS
        unknown = sorted(names - accepted)
        if unknown:
            raise InvalidInputs(
                f"not inputs of {pipe_cls.__name__}: {', '.join(unknown)}",
                unknown=unknown,
                accepted=sorted(accepted),
            )

    def _decode_inputs(self, request: GenerateRequest, timings: Timings, fill: str) -> dict[str, Image.Image]:
        """The image inputs, decoded; with a `fill` mode, the image keeps its transparency until it is pre-filled
        (fill.py), and its transparent area is the mask when the request gives none."""
        limits = {"max_bytes": self.settings.max_body_bytes, "max_pixels": self.settings.max_image_pixels}
        decoders = {"image": imaging.decode_image, "mask_image": imaging.decode_mask}
        if fill != "none":
            decoders["image"] = imaging.decode_rgba
        given = {field: getattr(request, field) for field in decoders}
        raw = {field: self._image_bytes(value, field, timings) for field, value in given.items() if value is not None}
        with timings.phase("decode"):
            inputs = {field: decoders[field](data, field, **limits) for field, data in raw.items()}
        if fill != "none":
            from .fill import prefill

            with timings.phase("fill"):
                inputs["image"], inputs["mask_image"] = prefill(inputs["image"], inputs.get("mask_image"), fill)
        return inputs

    def _fill_mode(self, request: GenerateRequest) -> str:
        return request.fill_mode or self.settings.fill_mode

    def _control_modules(
        self, request: GenerateRequest, model: LoadedModel, control_cls: Any, timings: Timings
    ) -> dict[str, Any] | None:
        """The request's ControlNets or T2I-Adapters, as the components of `control_cls` that carry them."""
        if not request.controlnet:
            return None
        loaded = self.store.controls(request.controlnet, model, timings)
        return control_modules(control_cls, [control.module for control in loaded])

    def _control_images(self, request: GenerateRequest, model: LoadedModel, timings: Timings) -> list[Image.Image]:
        """The conditioning images, decoded (and fetched, given as URLs) like the other image inputs."""
        limits = {"max_bytes": self.settings.max_body_bytes, "max_pixels": self.settings.max_image_pixels}
        images = []
        for index, control in enumerate(request.controlnet or ()):
            field = f"controlnet.{index}.image"
            data = self._image_bytes(control.image, field, timings)
            with timings.phase("decode"):
                image = imaging.decode_image(data, field, **limits)
            check_input_images({"image": image}, model.pipelines, model.spec.model_id)
            images.append(image)
        return images

    def _decode_ip_images(self, adapter: IPAdapter, timings: Timings) -> list[Image.Image]:
        """The image prompt(s), decoded like `image` (one list: they are the images of one IP-Adapter)."""
        limits = {"max_bytes": self.settings.max_body_bytes, "max_pixels": self.settings.max_image_pixels}
        raw = [self._image_bytes(value, "ip_adapter.image", timings) for value in adapter.images]
        with timings.phase("decode"):
            return [imaging.decode_image(data, "ip_adapter.image", **limits) for data in raw]

    def _image_bytes(self, value: str, field: str, timings: Timings) -> str | bytes:
        """An image input as it came (base64, data URI), or, given as an http(s) URL, the file it names: fetched
        through a connection to public addresses only (unless ALLOW_PRIVATE_URLS), capped like a request body."""
        if not is_http_url(value):
            return value
        from .outbound import fetch_bytes

        with timings.phase("download"):
            return fetch_bytes(
                value,
                guarded=not self.settings.allow_private_urls,
                what=field,
                max_bytes=self.settings.max_body_bytes,
                timeout_s=self.settings.download_timeout_s,
            )

    def _pipeline_class(self, model: LoadedModel, request: GenerateRequest) -> Any:
        """A request that asks for a pre-fill (fill_mode) is an inpainting request, mask_image or not; an
        inpainting pipeline may do without a mask_image when a fill mode (the request's or FILL_MODE) applies:
        the image's transparent area is its mask."""
        asks_fill = request.fill_mode not in (None, "none")
        has_image, has_mask = request.image is not None, request.mask_image is not None
        name = request.pipeline or self._server_pipeline()
        name = name or model.pipelines.default_name(has_image=has_image, has_mask=has_mask or asks_fill)
        cls = model.pipelines.resolve(name)
        needs_image = "Img2Img" in cls.__name__ or _inpaints(cls)
        if needs_image and not has_image:
            raise InvalidInputs(f"image: required by {cls.__name__}", field="image")
        if _inpaints(cls) and not has_mask and self._fill_mode(request) == "none":
            raise InvalidInputs(
                f"mask_image: required by {cls.__name__} (or a fill_mode, to inpaint the transparent area)",
                field="mask_image",
            )
        if asks_fill and not _inpaints(cls):
            raise InvalidInputs(
                f"fill_mode: pre-fills for inpainting, and {cls.__name__} does not inpaint", field="fill_mode"
            )
        return cls

    def _server_pipeline(self) -> str | None:
        """The configured PIPELINE; lpw_stable_diffusion names options (`_server_pipeline_options`), no class."""
        return None if self.settings.pipeline == LPW_PIPELINE else self.settings.pipeline

    def _server_pipeline_options(self, request: GenerateRequest) -> GenerateRequest:
        """PIPELINE=lpw_stable_diffusion: a request that names no pipeline has long prompts with A1111 weighting
        (unless it asks for compel's), as the original server's default lpw pipeline read them."""
        if request.pipeline is not None or self.settings.pipeline != LPW_PIPELINE:
            return request
        weighting = request.prompt_weighting or "a1111"
        return request.model_copy(update={"long_prompts": True, "prompt_weighting": weighting})

    def _scheduler_name(self, model: LoadedModel, request: GenerateRequest) -> str:
        return request.scheduler or self._default_scheduler(model)

    def _default_scheduler(self, model: LoadedModel) -> str:
        """The configured SCHEDULER where the model can use it; otherwise the model's own scheduler."""
        default = self.settings.scheduler
        if default in model.pipelines.scheduler_names():
            return default
        return type(model.pipelines.components["scheduler"]).__name__

    def schedulers(self) -> dict[str, Any]:
        """The schedulers the served (most recently used) model can run, and the one a request naming none gets.
        Blocking (the first call per model builds each scheduler once)."""
        model = self.store.most_recent
        if model is None:
            raise NotReady("no model is loaded yet")
        usable = model.pipelines.usable_scheduler_names()
        return {"model": model.spec.model_id, "default": self._default_scheduler(model), "schedulers": usable}

    def _call_kwargs(self, request: GenerateRequest, inputs: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
        import torch

        kwargs = {name: getattr(request, name) for name in CALL_FIELDS if getattr(request, name) is not None}
        kwargs |= inputs | request.extra  # the names `_input_names` gave, checked before fetching
        # One CPU generator per image: image i is reproducible alone from seeds[i], on any device.
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs["output_type"] = "pil"
        return kwargs

    def _check_pixels(self, request: GenerateRequest) -> None:
        if request.width and request.height:
            pixels = request.width * request.height
            if pixels > self.settings.max_image_pixels:
                raise InvalidInputs(
                    f"width x height = {pixels} pixels exceeds the limit of {self.settings.max_image_pixels}"
                )

    # --- the call --------------------------------------------------------------------------------------------

    def _loop(self, pipe: Any, kwargs: dict[str, Any]) -> str:
        """Which denoising loop runs this request: ours (batched step by step) or the pipeline's own."""
        return "batched" if self.steps is not None and self.steps.supports(pipe, kwargs) else "diffusers"

    def _call(
        self,
        pipe: Any,
        kwargs: dict[str, Any],
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
        loop: str,
    ) -> Any:
        import torch

        try:
            if loop == "batched":
                assert self.steps is not None
                return self.steps.denoise(pipe, kwargs, progress, cancel)
            return self._diffusers_call(pipe, kwargs, progress, cancel)
        except torch.cuda.OutOfMemoryError as exc:
            raise PipelineError(f"out of GPU memory: {exc}; try fewer or smaller images") from exc

    def _diffusers_call(
        self, pipe: Any, kwargs: dict[str, Any], progress: ProgressCallback | None, cancel: threading.Event | None
    ) -> Any:
        """The pipeline's own loop; its UNet calls still meet the others' when steps are shared."""
        parameters = call_parameters(type(pipe))
        if "callback_on_step_end" in parameters:
            kwargs["callback_on_step_end"] = _step_callback(progress, cancel)
        elif {"callback", "callback_steps", "num_inference_steps"} <= parameters.keys():
            # older pipelines (the T2I-Adapter ones) report each step through `callback` instead
            steps = kwargs.get("num_inference_steps", parameters["num_inference_steps"].default)
            kwargs |= {"callback": _legacy_step_callback(progress, cancel, steps), "callback_steps": 1}
        batched = self.steps.session(pipe) if self.steps and hasattr(pipe, "unet") else nullcontext()
        try:
            with batched:
                output = pipe(**kwargs)
        except (ValueError, TypeError) as exc:
            # diffusers reports bad arguments (sizes, strength, prompt/batch mismatch) this way
            raise InvalidInputs(f"{type(pipe).__name__} rejected the inputs: {exc}") from exc
        if cancel is not None and cancel.is_set():  # pipelines without step callbacks
            raise Cancelled("request cancelled")
        return output

    def _meta(
        self, model: LoadedModel, pipe_cls: Any, scheduler: Any, request: GenerateRequest, seeds: list[int]
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "MODEL_ID": model.spec.model_id,
            "PIPELINE": pipe_cls.__name__,
            "SCHEDULER": type(scheduler).__name__,
            "PRECISION": model.precision,
            "seed": seeds[0],
            "seeds": seeds,
            "image_format": request.image_format,
            "device": model.device,
            "versions": versions(),
        }
        if request.scheduler and request.scheduler != meta["SCHEDULER"]:
            meta["SCHEDULER_ALIAS"] = request.scheduler
        loras, embeddings = model.spec.adapters_json()
        meta |= {"LORA_WEIGHTS": loras} if loras else {}
        meta |= {"TEXTUAL_INVERSIONS": embeddings} if embeddings else {}
        if request.request_id:
            meta["startRequestId"] = request.request_id
        return meta


def _inpaints(pipe_cls: Any) -> bool:
    return "Inpaint" in pipe_cls.__name__


def _input_names(request: GenerateRequest) -> set[str]:
    """The pipeline arguments a request gives (as `Runner._call_kwargs` will pass them)."""
    given = {name for name in (*CALL_FIELDS, "image", "mask_image") if getattr(request, name) is not None}
    return given | set(request.extra)


def check_steps_left(pipe: Any, kwargs: dict[str, Any]) -> None:
    """With a strength (SD and SDXL img2img, inpainting), int(strength x steps) steps are denoised: none left would
    fail half-way (SDXL img2img with empty latents), so it is refused here, naming the cause. The flow-matching
    pipelines (SD3, Flux) round the steps up, so only a strength of 0 leaves none: SD3 checks none and failed on
    the empty timesteps (a RuntimeError, a 500)."""
    name, parameters = type(pipe).__name__, call_parameters(type(pipe))
    flow_matching = name.startswith(("StableDiffusion3", "Flux"))
    if not name.startswith("StableDiffusion") and not flow_matching:
        return
    if "strength" not in parameters or "num_inference_steps" not in parameters or kwargs.get("denoising_start"):
        return
    steps = kwargs.get("num_inference_steps", parameters["num_inference_steps"].default)
    strength = kwargs.get("strength", parameters["strength"].default)
    if not isinstance(steps, int) or not isinstance(strength, int | float):
        return
    if (steps * strength if flow_matching else int(steps * strength)) <= 0:
        raise InvalidInputs(
            f"strength {strength:g} x num_inference_steps {steps} = {steps * strength:g}: less than one denoising "
            "step is left; raise strength or num_inference_steps",
            field="strength",
        )


def _legacy_step_callback(
    progress: ProgressCallback | None, cancel: threading.Event | None, steps: int
) -> Callable[..., None]:
    def on_step(step: int, timestep: Any, latents: Any) -> None:
        if progress is not None:
            progress(step + 1, steps)
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"request cancelled after step {step + 1}")

    return on_step


def _step_callback(progress: ProgressCallback | None, cancel: threading.Event | None) -> Callable[..., Any]:
    def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if progress is not None:
            progress(step + 1, pipe.num_timesteps)
        if cancel is not None and cancel.is_set():
            # Leave the loop now: no further step and no decode of a half-denoised image; the batch goes on.
            raise Cancelled(f"request cancelled after step {step + 1}")
        return callback_kwargs

    return on_step_end
