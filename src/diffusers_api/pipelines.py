"""Pipeline and scheduler registry; derived pipelines share the loaded model's components.

A loaded model holds one base pipeline. Every request gets a *fresh, light* pipeline object of the class it
asked for, built from the base's components (same UNet, VAE, text encoders: no second copy of weights) and a
*fresh scheduler* built from the model's scheduler config. Schedulers carry per-run state (timesteps, step
index, solver history) and pipelines carry per-run flags (guidance scale, interrupt), so nothing a request
chooses can leak into another, concurrent ones included.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import types
import typing
import warnings
from collections.abc import Mapping
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from .errors import InvalidScheduler, NoSuchPipeline

if TYPE_CHECKING:
    from pathlib import Path

    from diffusers import DiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

log = logging.getLogger(__name__)

SHORT_NAMES = {
    "txt2img": "AutoPipelineForText2Image",
    "img2img": "AutoPipelineForImage2Image",
    "inpaint": "AutoPipelineForInpainting",
}

# Alias -> (scheduler class, config overrides). Names as UIs (A1111, ComfyUI) show them.
SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
_ALIAS_LOOKUP = {alias.lower(): alias for alias in SCHEDULER_ALIASES}

# Per-request choices are passed as __init__ options only where the class takes them.
_PIPELINE_OPTIONS = ("requires_safety_checker", "force_zeros_for_empty_prompt", "add_watermarker")


def _diffusers() -> Any:
    import diffusers

    return diffusers


def _is_pipeline_class(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return inspect.isclass(obj) and issubclass(obj, DiffusionPipeline)


@lru_cache(maxsize=64)
def _auto_task_class(auto_name: str, base_class_name: str) -> type | None:
    """The concrete class an AutoPipelineFor* name maps to for a model whose base class is `base_class_name`."""
    from diffusers.pipelines import auto_pipeline

    mapping = {
        "AutoPipelineForText2Image": auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        "AutoPipelineForImage2Image": auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        "AutoPipelineForInpainting": auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
    }[auto_name]
    task_class: type | None = auto_pipeline._get_task_class(mapping, base_class_name, throw_error_if_not_exist=False)
    return task_class


class _Unfit(Exception):
    """Why a pipeline name does not fit a model; `resolve` makes it a NoSuchPipeline that lists what does."""


class _Unusable(Exception):
    """Why a scheduler name cannot serve a model; `scheduler` makes it an INVALID_SCHEDULER that lists what can."""


class ModelPipelines:
    """The pipelines of one loaded model: resolves names to classes and builds per-request instances."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.components: dict[str, Any] = dict(base.components)
        self._options = {k: base.config[k] for k in _PIPELINE_OPTIONS if k in base.config}
        self._classes: dict[str, type] = {}
        self._schedulers: dict[tuple[type, tuple[tuple[str, Any], ...]], SchedulerMixin] = {}  # pristine, copied
        self._usable_schedulers: list[str] | None = None
        self._available: list[str] | None = None
        _tune_for_device(self.components)
        _alias_clip_text_model(self.components)
        self._tokenizers = {
            name: LockedTokenizer(module)
            for name, module in self.components.items()
            if name.startswith("tokenizer") and module is not None
        }

    # --- pipelines -------------------------------------------------------------------------------------------

    def available(self) -> list[str]:
        """Names a request may use with this model: the short and Auto* names, then every diffusers pipeline class
        that `resolve` takes (the same check), so that the list a refusal carries names all a request may ask for.

        Made on the first refusal and kept: it imports every pipeline module of diffusers (about a second)."""
        if self._available is None:
            names = [*SHORT_NAMES, *SHORT_NAMES.values(), type(self.base).__name__]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation warnings of modules only imported to be listed
                names += [name for name in _pipeline_class_names() if self._fits(name)]
            self._available = list(dict.fromkeys(names))
        return self._available

    def _fits(self, name: str) -> bool:
        try:
            self._resolve_uncached(name)
        except _Unfit:
            return False
        return True

    def warm(self) -> None:
        """Resolve the task names (txt2img, img2img, inpaint) and the model's own class now, while the model
        loads: the first resolution imports diffusers' AutoPipeline tables, about a hundred pipeline modules
        (1-2 s), which the first request would otherwise wait for. A name this model cannot serve stays
        unresolved, and is refused when a request asks for it."""
        for name in (*SHORT_NAMES, type(self.base).__name__):
            try:
                self._classes[name] = self._resolve_uncached(name)
            except _Unfit:
                continue

    def default_name(self, *, has_image: bool, has_mask: bool) -> str:
        """The pipeline a request gets when it names none: chosen by the images it carries. A model whose own
        pipeline takes them and has no image-to-image or inpainting variant (an upscaler such as
        StableDiffusionUpscalePipeline, InstructPix2Pix) runs its own pipeline."""
        task = "inpaint" if has_mask else "img2img" if has_image else None
        if task is None or self._runs_its_own(task, "mask_image" if has_mask else "image"):
            return type(self.base).__name__
        return task

    def _runs_its_own(self, task: str, input_name: str) -> bool:
        base: Any = type(self.base)
        return input_name in call_arguments(base) and _auto_task_class(SHORT_NAMES[task], base.__name__) is None

    def resolve(self, name: str) -> type:
        """Pipeline class for `name`, checked against this model's components; cached per name."""
        if name not in self._classes:
            try:
                self._classes[name] = self._resolve_uncached(name)
            except _Unfit as unfit:
                raise NoSuchPipeline(str(unfit), requested=name, available=self.available()) from None
        return self._classes[name]

    def _resolve_uncached(self, name: str) -> type:
        class_name = SHORT_NAMES.get(name, name)
        if class_name in SHORT_NAMES.values():
            task_class = _auto_task_class(class_name, type(self.base).__name__)
            if task_class is None:
                raise _Unfit(f"{class_name} has no pipeline for {type(self.base).__name__}")
            return self._checked(task_class)
        candidate: type | None = getattr(_diffusers(), class_name, None)
        if candidate is None or not _is_pipeline_class(candidate):
            raise _Unfit(f"'{name}' is not a diffusers pipeline")
        return self._checked(candidate)

    def _checked(self, cls: type) -> type:
        family, base_family = _family(cls.__name__), _family(type(self.base).__name__)
        if family and base_family and family != base_family:
            raise _Unfit(f"{cls.__name__} is a {family} pipeline; this model is {base_family}")
        missing = self._missing_components(cls)
        if missing:
            raise _Unfit(f"{cls.__name__} needs components this model lacks: {', '.join(missing)}")
        self._check_denoiser(cls)
        return cls

    def _check_denoiser(self, cls: type) -> None:
        """The class must take this model's UNet (or transformer) as what it is: DDIMPipeline has a `unet` too,
        an unconditional one, and would fail half-way through a call with a text-to-image model's."""
        params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
        for role in ("unet", "transformer"):
            module = self.components.get(role)
            if module is None:
                continue
            if role not in params:
                raise _Unfit(f"{cls.__name__} takes no {role}, and this model denoises with its {role}")
            if not _annotation_accepts(params[role].annotation, module):
                wanted = _annotation_name(params[role].annotation)
                raise _Unfit(f"{cls.__name__} takes {wanted} as its {role}; this model's is a {type(module).__name__}")

    def _missing_components(self, cls: Any) -> list[str]:
        expected, _ = _signature_keys(cls)
        optional = set(cls._optional_components) | _defaulted_params(cls)
        return [name for name in expected if self.components.get(name) is None and name not in optional]

    def build(
        self, cls: Any, scheduler: SchedulerMixin, *, safety_checker: bool, extra: dict[str, Any] | None = None
    ) -> DiffusionPipeline:
        """A fresh pipeline of `cls` over the shared components, with its own scheduler (and `extra` components: a
        request's ControlNets or T2I-Adapters)."""
        components = self.components | {"scheduler": scheduler} | (extra or {})
        pipe = self._new(cls, components, safety_checker=safety_checker)
        for name, tokenizer in self._tokenizers.items():
            if getattr(pipe, name, None) is not None:
                # object.__setattr__: DiffusionPipeline.__setattr__ would record the wrapper in the config
                object.__setattr__(pipe, name, tokenizer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _new(self, cls: Any, components: dict[str, Any], *, safety_checker: bool = True) -> Any:
        expected, optional_params = _signature_keys(cls)
        kwargs: dict[str, Any] = {name: components.get(name) for name in expected}
        kwargs.update({k: v for k, v in self._options.items() if k in optional_params})
        if not safety_checker and "safety_checker" in kwargs:
            kwargs["safety_checker"] = None
            if "requires_safety_checker" in optional_params:
                kwargs["requires_safety_checker"] = False
        return cls(**kwargs)

    # --- variants with adapters --------------------------------------------------------------------------------

    def with_adapters(
        self, loras: list[tuple[Path, float, str]], embeddings: list[tuple[Path, str | None, str]]
    ) -> tuple[ModelPipelines, dict[str, Any]]:
        """This model with `loras` (file, scale, URL) fused and textual inversions `embeddings` (file, token, URL)
        added, each in copies of the modules it touches (see models/adapters.py); every other component stays
        shared. Returns the variant and its own modules."""
        from .models.adapters import LORA_COMPONENTS, TEXT_PAIRS, apply_embeddings, apply_loras

        names = set(LORA_COMPONENTS) if loras else set()
        if embeddings:
            names |= {name for pair in TEXT_PAIRS for name in pair}
        shared = {name: self.components[name] for name in sorted(names) if self.components.get(name) is not None}
        pipe = self._new(type(self.base), self.components | {n: copy.deepcopy(m) for n, m in shared.items()})
        touched = apply_loras(pipe, loras) | apply_embeddings(pipe, embeddings)
        pipe.register_modules(**{name: module for name, module in shared.items() if name not in touched})
        variant = ModelPipelines(pipe)
        for name in self._tokenizers:
            if name not in touched:  # the same tokenizer, so the same lock
                variant._tokenizers[name] = self._tokenizers[name]
        return variant, {name: getattr(pipe, name) for name in sorted(touched)}

    # --- schedulers ------------------------------------------------------------------------------------------

    def scheduler(self, name: str) -> SchedulerMixin:
        """A new scheduler instance of `name` (class or alias) built from the model's scheduler config, or
        INVALID_SCHEDULER listing the names this model can build."""
        try:
            return self._scheduler(name)
        except _Unusable as exc:
            raise InvalidScheduler(str(exc), requested=name, available=self.usable_scheduler_names()) from None

    def _scheduler(self, name: str) -> SchedulerMixin:
        """Built once per scheduler (class and options) and copied for each request: a copy takes 0.5 ms,
        `from_config` 3 ms (it reads the class's signature again and again)."""
        cls, overrides = self._scheduler_class(name)
        key = (cls, tuple(sorted(overrides.items())))  # one per scheduler, however the request spells it
        pristine = self._schedulers.get(key)
        if pristine is None:
            try:
                pristine = cls.from_config(dict(self.components["scheduler"].config), **overrides)
            except Exception as exc:  # an optional library missing (torchsde), or options this config refuses
                raise _Unusable(f"scheduler '{name}' cannot be built for this model: {exc}") from exc
            self._schedulers[key] = pristine
        return copy.deepcopy(pristine)

    def scheduler_names(self) -> list[str]:
        compatible = sorted(c.__name__ for c in self.components["scheduler"].compatibles)
        return [*SCHEDULER_ALIASES, *compatible]

    def usable_scheduler_names(self) -> list[str]:
        """The names of `scheduler_names()` this model can build, in that order: an alias of an incompatible class
        (`LCM` on an SD model) or a scheduler whose optional library is missing (`DPMSolverSDEScheduler` without
        torchsde) is left out. Each is tried once per model (some milliseconds each): call it off the event loop."""
        if self._usable_schedulers is None:
            self._usable_schedulers = [name for name in self.scheduler_names() if self._builds(name)]
        return self._usable_schedulers

    def _builds(self, name: str) -> bool:
        try:
            self._scheduler(name)
        except _Unusable as exc:  # incompatible, or an optional library missing: either way unusable here
            log.debug("scheduler %s is not usable with this model: %s", name, exc)
            return False
        return True

    def _scheduler_class(self, name: str) -> tuple[Any, dict[str, Any]]:
        alias = _ALIAS_LOOKUP.get(name.strip().lower())
        class_name, overrides = SCHEDULER_ALIASES[alias] if alias else (name.strip(), {})
        cls = getattr(_diffusers(), class_name, None)
        compatible = {c.__name__ for c in self.components["scheduler"].compatibles}
        if cls is None or class_name not in compatible | {type(self.components["scheduler"]).__name__}:
            raise _Unusable(f"unknown or incompatible scheduler '{name}'")
        return cls, overrides


def _tune_for_device(components: dict[str, Any]) -> None:
    """channels_last for the convolution-heavy modules on CUDA: cuDNN's fast kernels want NHWC."""
    import torch

    for name in ("unet", "vae"):
        module = components.get(name)
        if isinstance(module, torch.nn.Module) and next(module.parameters()).device.type == "cuda":
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _alias_clip_text_model(components: dict[str, Any]) -> None:
    """diffusers' `clip_skip` (SD 1.x/2.x and the pipelines that copy their `encode_prompt`) reads
    `text_encoder.text_model.final_layer_norm`, and transformers 5's `CLIPTextModel` holds its layers itself, with
    no `text_model` (diffusers issue #14124, open with diffusers 0.42.1 and transformers 5.25): a clip_skip above 0
    failed with an AttributeError. Each such encoder of this model gets `text_model` naming itself, as an attribute
    of that instance alone: set on the class, it changed how transformers and diffusers load other models in the
    process (single-file checkpoints failed with "Cannot copy out of meta tensor"). `object.__setattr__` keeps it
    out of the module's children, so its state dict, `.to()` and saving are unchanged."""
    for module in components.values():
        if (
            type(module).__name__ == "CLIPTextModel"
            and "final_layer_norm" in getattr(module, "_modules", {})
            and "text_model" not in module._modules
            and not hasattr(type(module), "text_model")
        ):
            object.__setattr__(module, "text_model", module)


class LockedTokenizer:
    """A shared tokenizer that concurrent requests can call safely.

    A Hugging Face fast tokenizer keeps padding and truncation as state of its Rust backend and sets them on
    every call; diffusers calls it with padding="max_length" and then padding="longest". Two requests on two
    threads interleave those settings and get each other's padding (prompt embeddings of the wrong length, or
    silently different ones). Calls are serialised here; they take microseconds.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.__dict__.update(tokenizer=tokenizer, _lock=threading.Lock())

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.tokenizer, name)
        if callable(attribute) and not isinstance(attribute, type):
            return self._locked(attribute)
        return attribute

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self.tokenizer(*args, **kwargs)

    def _locked(self, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return method(*args, **kwargs)

        return call


@lru_cache(maxsize=256)
def _family(class_name: str) -> str | None:
    """The model family diffusers' AutoPipelines file a class under ("stable-diffusion-xl", ...), if any.

    Optional components hide mismatches (SDXL lists both its text encoders as optional), so a pipeline of
    another family is refused by family, before it would crash half-way through a call."""
    from diffusers.pipelines import auto_pipeline

    family: str | None = auto_pipeline._get_model(class_name)
    return family


def pipeline_family(cls: type) -> str | None:
    """The model family diffusers files a pipeline class under ("stable-diffusion", "stable-diffusion-xl", ...)."""
    return _family(cls.__name__)


def _pipeline_class_names() -> list[str]:
    """The names diffusers exports that may be pipeline classes (`resolve` checks each)."""
    return sorted(name for name in dir(_diffusers()) if "Pipeline" in name and not name.startswith("_"))


def _annotation_accepts(annotation: Any, module: Any) -> bool:
    """Whether `module` fits a parameter's annotation; an annotation that names no class accepts anything."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_annotation_accepts(arg, module) for arg in typing.get_args(annotation) if arg is not type(None))
    return isinstance(module, annotation) if inspect.isclass(annotation) else True


def _annotation_name(annotation: Any) -> str:
    if inspect.isclass(annotation):
        return f"a {annotation.__name__}"
    return str(annotation)


# Signatures are read per class, once: inspect.signature takes about 0.2 ms a call, and every request needs a few.


def call_parameters(cls: Any) -> Mapping[str, inspect.Parameter]:
    """The parameters of `cls.__call__` (a pipeline class)."""
    return _call_parameters(cls)


@cache
def _call_parameters(cls: Any) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(cls.__call__).parameters


@cache
def call_arguments(cls: Any) -> frozenset[str]:
    """The arguments a request may name for `cls.__call__`: its named parameters, without `self` and without a
    catch-all `*args` / `**kwargs` (a request naming `kwargs` would otherwise slip anything through it)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = _call_parameters(cls).values()
    return frozenset(p.name for p in params if p.kind not in variadic and p.name != "self")


@cache
def _signature_keys(cls: Any) -> tuple[list[str], set[str]]:
    """diffusers' (expected modules, optional parameters) of a pipeline class's __init__."""
    keys: tuple[list[str], set[str]] = cls._get_signature_keys(cls)
    return keys


def _defaulted_params(cls: Any) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {name for name, p in params.items() if p.default is not inspect.Parameter.empty}
