"""The model store: which model a request means, where its weights come from, and the one resident model.

Resolve (builtin, local directory, hub id) -> load through `DiffusionPipeline.from_pretrained` (the built-in
tiny models too: they are generated into MODELS_DIR first) -> keep resident. A request for another model gets
MODEL_MISMATCH unless RUNTIME_DOWNLOADS is on, in which case the resident model is swapped and its memory freed.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError, ModelMismatch, ModelNotFound, NoModelId
from .builtin import ensure_builtin, is_builtin

if TYPE_CHECKING:
    from ..config import Settings
    from ..pipelines import ModelPipelines
    from ..schema import GenerateRequest

log = logging.getLogger(__name__)

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class ModelSpec:
    """Everything that names one set of weights in one precision."""

    model_id: str
    hf_model_id: str | None = None
    revision: str | None = None
    variant: str | None = None
    precision: str = ""
    model_url: str | None = None
    checkpoint_url: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec | None:
        if not settings.model_id:
            return None
        return cls(
            model_id=settings.model_id,
            hf_model_id=settings.hf_model_id,
            revision=settings.model_revision,
            variant=settings.model_variant,
            precision=settings.model_precision,
            model_url=settings.model_url,
            checkpoint_url=settings.checkpoint_url,
        )

    def for_request(self, request: GenerateRequest) -> ModelSpec:
        """This spec with the request's choices laid over it. A new model id starts from a clean slate."""
        base = self if request.model in (None, self.model_id) else ModelSpec(model_id=request.model or "")
        asked = {
            "hf_model_id": request.hf_model_id,
            "revision": request.revision,
            "variant": request.variant,
            "precision": request.precision,
            "model_url": request.model_url,
            "checkpoint_url": request.checkpoint_url,
        }
        return dataclasses.replace(base, **{k: v for k, v in asked.items() if v is not None})

    def describe(self) -> str:
        parts = [self.model_id] + [
            f"{name}={value}"
            for name, value in (
                ("revision", self.revision),
                ("variant", self.variant),
                ("precision", self.precision),
            )
            if value
        ]
        return " ".join(parts)


@dataclass
class LoadedModel:
    spec: ModelSpec
    pipelines: ModelPipelines
    device: str
    dtype: str
    source: str
    load_ms: float


def resolve_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class ModelStore:
    """Holds the resident model and loads others on demand (when the settings allow it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.default_spec = ModelSpec.from_settings(settings)
        self.loaded: LoadedModel | None = None

    def load_default(self) -> LoadedModel | None:
        """Load the configured model (at startup). Returns None when no model is configured."""
        if self.default_spec is None:
            return None
        return self._ensure(self.default_spec)

    def get(self, request: GenerateRequest) -> LoadedModel:
        """The model a request asks for: the resident one, or (RUNTIME_DOWNLOADS) a newly loaded one."""
        spec = self._spec_for(request)
        if self.loaded is not None and self.loaded.spec == spec:
            return self.loaded
        if not self.settings.runtime_downloads:
            available = [self.loaded.spec.model_id] if self.loaded else []
            raise ModelMismatch(
                f"this server serves {self.loaded.spec.describe() if self.loaded else 'no model'}; "
                f"set RUNTIME_DOWNLOADS=1 to allow requests for {spec.describe()}",
                requested=spec.model_id,
                available=available,
            )
        return self._ensure(spec)

    def _spec_for(self, request: GenerateRequest) -> ModelSpec:
        base = self.loaded.spec if self.loaded else self.default_spec
        if base is None:
            if not request.model:
                raise NoModelId("no model requested and no MODEL_ID configured")
            base = ModelSpec(model_id=request.model)
        return base.for_request(request)

    def _ensure(self, spec: ModelSpec) -> LoadedModel:
        if self.loaded is not None and self.loaded.spec == spec:
            return self.loaded
        self.unload()
        self.loaded = self._load(spec)
        return self.loaded

    def unload(self) -> None:
        """Drop the resident model and give its memory back to the device."""
        if self.loaded is None:
            return
        self.loaded = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, spec: ModelSpec) -> LoadedModel:
        from ..pipelines import ModelPipelines

        started = time.perf_counter()
        source = self._source(spec)
        pipe = self._from_pretrained(spec, source)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        elapsed = (time.perf_counter() - started) * 1000
        dtype = str(getattr(pipe, "dtype", "")).removeprefix("torch.")
        log.info("loaded %s from %s on %s (%s) in %.0f ms", spec.describe(), source, self.device, dtype, elapsed)
        return LoadedModel(spec, ModelPipelines(pipe), self.device, dtype, str(source), elapsed)

    def _source(self, spec: ModelSpec) -> str | Path:
        if spec.model_url or spec.checkpoint_url:
            raise ModelLoadError("MODEL_URL and CHECKPOINT_URL sources are not supported by this build yet")
        if is_builtin(spec.model_id):
            return ensure_builtin(spec.model_id, self.settings.models_dir)
        local = Path(spec.model_id).expanduser()
        if local.is_dir():
            return local
        if spec.model_id.startswith(("/", "./", "../", "~")):
            raise ModelNotFound(f"model directory {spec.model_id} does not exist", requested=spec.model_id)
        return spec.hf_model_id or spec.model_id

    def _from_pretrained(self, spec: ModelSpec, source: str | Path) -> Any:
        import torch
        from diffusers import DiffusionPipeline

        kwargs: dict[str, Any] = {}
        if spec.precision:
            kwargs["dtype"] = getattr(torch, DTYPES[spec.precision])
        if isinstance(source, str):
            token = self.settings.hf_auth_token
            kwargs |= {
                "cache_dir": self.settings.models_dir / "hub",
                "revision": spec.revision,
                "variant": spec.variant,
                "token": token.get_secret_value() if token else None,
            }
        elif spec.variant:
            kwargs["variant"] = spec.variant
        try:
            return DiffusionPipeline.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            if _caused_by(exc, _NOT_FOUND):
                raise ModelNotFound(f"model {spec.describe()} not found: {exc}", requested=spec.model_id) from exc
            raise ModelLoadError(f"could not load {spec.describe()} from {source}: {exc}") from exc


def _not_found_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    # FileNotFoundError covers the hub's "not in the local cache" (LocalEntryNotFoundError)
    return (
        FileNotFoundError,
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.OfflineModeIsEnabled,
    )


def _caused_by(exc: BaseException | None, kinds: Callable[[], tuple[type[BaseException], ...]]) -> bool:
    """Whether `exc` or anything in its cause chain is one of `kinds` (diffusers wraps hub errors in OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds()):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


_NOT_FOUND = _not_found_errors
