"""The model store: which model a request means, and the models resident on the device.

A request's ModelSpec is resolved to a local directory by `sources.fetch` (builtin, local directory, hub,
cloud-cache archive, single-file checkpoint), loaded through `DiffusionPipeline.from_pretrained`, and kept
resident. With RUNTIME_DOWNLOADS=1 a request may name any model: resident models form an LRU bounded by
MODEL_MEMORY_BUDGET (bytes of weights; unset: one model at a time), and an evicted model's memory is given
back to the device. With RUNTIME_DOWNLOADS=0 another model gets MODEL_MISMATCH. A request with LoRAs gets a
variant of a resident model (models/adapters.py), kept with it and evicted with it; so does one with textual
inversions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..devices import free_device_memory, resolve_device
from ..errors import ModelLoadError, ModelMismatch, ModelNotFound, NoModelId, PipelineError
from . import archive, disk
from .adapters import fetch_adapter
from .controls import ControlSpec, LoadedControl, check_fits, fetch_control, load_control
from .ip_adapter import IPAdapterSpec, IPAdapterVariant, fetch_ip_adapter, make_variant
from .loaded import LoadedModel
from .locations import check_request_paths
from .sizes import estimate_bytes, module_bytes, pipeline_bytes
from .sources import caused_by, fetch, not_found_errors, phase, torch_dtype
from .spec import ModelSpec

if TYPE_CHECKING:
    from ..config import Settings
    from ..pipelines import ModelPipelines
    from ..schema import GenerateRequest, IPAdapter
    from ..schema.controls import ControlInput

__all__ = ["LoadedModel", "ModelSpec", "ModelStore", "cached_models"]

log = logging.getLogger(__name__)

# Without MODEL_MEMORY_BUDGET, how many control models stay resident (those of the last requests).
MAX_CONTROLS_KEPT = 4

# IP-Adapter variants kept per model (each holds the adapter's layers and image encoder, not the UNet's weights).
IP_ADAPTERS_KEPT = 2
# $timings phases that the store reports apart from loadModel.
TRANSFER_PHASES = ("download", "compress", "upload")


class ModelStore:
    """Resident models, most recently used last; loads others on demand when the settings allow it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default_spec = ModelSpec.from_settings(settings)
        self._resident: OrderedDict[ModelSpec, LoadedModel] = OrderedDict()
        # One load at a time: two threads asking for the same new model must not load it twice.
        self._lock = threading.RLock()
        # variants being made, outside the lock: (id of the model, spec) -> the variant, once made
        self._making: dict[tuple[int, ModelSpec], Future[LoadedModel]] = {}
        # Control models (ControlNets, T2I-Adapters: models/controls.py), least recently used first. They share
        # MODEL_MEMORY_BUDGET with the models: `_last_used` orders both for eviction.
        self._controls: OrderedDict[ControlSpec, LoadedControl] = OrderedDict()
        self._last_used: dict[ModelSpec | ControlSpec, int] = {}
        self._clock = 0
        # IP-Adapter variants are made one at a time, outside the store's lock
        self._ip_lock = threading.Lock()

    @cached_property
    def device(self) -> str:
        """The device models load on. Resolved on first use (it imports torch), on the loading thread, so that
        building the store, and the server around it, takes no time away from answering health probes."""
        return resolve_device(self.settings.device)

    @property
    def most_recent(self) -> LoadedModel | None:
        """The most recently used resident model."""
        models = list(self._resident.values())
        return models[-1] if models else None

    @property
    def resident(self) -> list[LoadedModel]:
        """Resident models, least recently used first."""
        return list(self._resident.values())

    def resident_bytes(self) -> int:
        return sum(model.total_bytes for model in self.resident) + sum(c.bytes for c in self._controls.values())

    @property
    def resident_controls(self) -> list[LoadedControl]:
        """Resident control models, least recently used first."""
        return list(self._controls.values())

    def load_default(self, timings: dict[str, float] | None = None) -> LoadedModel | None:
        """Load the configured model (at startup). Returns None when no model is configured. First clears what
        builds killed half-way left in MODELS_DIR (disk.remove_stale)."""
        disk.remove_stale(self.settings.models_dir)
        if self.default_spec is None:
            return None
        with self._lock:
            return self._ensure(self.default_spec, timings)

    def get(self, request: GenerateRequest, timings: dict[str, float] | None = None) -> LoadedModel:
        """The model a request asks for; records loadModel (and download/upload) in `timings`."""
        started = time.perf_counter()
        transfers = _transfer_ms(timings)
        try:
            spec = self._spec_for(request)
            check_request_paths(spec, self.default_spec, self.settings)
            base = self._get(spec.without_adapters, timings)
            if not spec.has_adapters:
                return base
            # Adapter files are fetched outside the lock: a download must not hold up every other request.
            settings = self.settings
            loras = [(fetch_adapter(url, settings, "LoRA", timings), scale, url) for url, scale in spec.loras]
            embeddings = [
                (fetch_adapter(url, settings, "textual inversion", timings), token, url)
                for url, token in spec.embeddings
            ]
            return self._variant(base, spec, loras, embeddings)
        finally:
            if timings is not None:
                elapsed = (time.perf_counter() - started) * 1000 - (_transfer_ms(timings) - transfers)
                timings["loadModel"] = round(timings.get("loadModel", 0.0) + elapsed, 2)

    def _get(self, spec: ModelSpec, timings: dict[str, float] | None) -> LoadedModel:
        with self._lock:
            model = self._resident.get(spec)
            if model is not None:
                self._resident.move_to_end(spec)
                self._touch(spec)
                return model
            if not self.settings.runtime_downloads:
                raise self._mismatch(spec)
            return self._ensure(spec, timings)

    def _variant(
        self,
        base: LoadedModel,
        spec: ModelSpec,
        loras: list[tuple[Path, float, str]],
        embeddings: list[tuple[Path, str | None, str]],
    ) -> LoadedModel:
        """`base` with the adapters of `spec` (made on first use, then kept while LORA_VARIANTS_KEPT allows).

        Making one copies modules and fuses weights (seconds for a large model on a GPU), so it runs outside the
        store's lock: other requests go on meanwhile. Requests for the same variant wait for the one making it."""
        key = (id(base), spec)
        with self._lock:
            variant = base.variants.get(spec)
            if variant is not None:
                base.variants.move_to_end(spec)
                return variant
            making, mine = self._making.get(key), False
            if making is None:
                making, mine = Future(), True
                self._making[key] = making
        if not mine:
            return making.result()
        try:
            pipelines, own, elapsed = _make_variant(base, loras, embeddings)
        except BaseException as exc:
            with self._lock:
                del self._making[key]
            making.set_exception(exc)
            raise
        size = sum(module_bytes(module) for module in own.values())
        variant = LoadedModel(spec, pipelines, base.device, base.dtype, base.source, elapsed, size)
        log.info("made %s (%d bytes of its own) in %.0f ms", spec.describe(), size, elapsed)
        with self._lock:
            del self._making[key]
            base.variants[spec] = variant
            while len(base.variants) > self.settings.lora_variants_kept:
                dropped, _ = base.variants.popitem(last=False)
                log.info("dropping %s to keep %d variants", dropped.describe(), self.settings.lora_variants_kept)
                free_device_memory()
            self._trim()  # the variant's copies count against MODEL_MEMORY_BUDGET: older models may have to go
        making.set_result(variant)
        return variant

    def ip_adapter(self, model: LoadedModel, adapter: IPAdapter, timings: dict[str, float] | None) -> IPAdapterVariant:
        """`model` with the IP-Adapter `adapter` names (models/ip_adapter.py): made on first use (its files fetched
        outside any lock), then kept with the model, IP_ADAPTERS_KEPT per model."""
        spec = IPAdapterSpec.of(adapter)
        with self._lock:
            if spec in model.ip_adapters:
                model.ip_adapters.move_to_end(spec)
                return model.ip_adapters[spec]
        directory = fetch_ip_adapter(spec, self.settings, timings)
        with self._ip_lock:
            found = model.ip_adapters.get(spec)  # made by a request that held the lock before this one
            if found is not None:
                return found
            with phase(timings, "loadModel"):
                variant = make_variant(model.pipelines, directory, spec)
            with self._lock:
                model.ip_adapters[spec] = variant
                while len(model.ip_adapters) > IP_ADAPTERS_KEPT:
                    dropped, _ = model.ip_adapters.popitem(last=False)
                    log.info("dropping IP-Adapter %s to keep %d", dropped.describe(), IP_ADAPTERS_KEPT)
                    free_device_memory()
                self._trim()
        return variant

    def _mismatch(self, spec: ModelSpec) -> ModelMismatch:
        served = self.most_recent.spec.describe() if self.most_recent else "no model"
        return ModelMismatch(
            f"this server serves {served}; set RUNTIME_DOWNLOADS=1 to allow requests for {spec.describe()}",
            requested=spec.model_id,
            available=[model.spec.model_id for model in self.resident],
        )

    def _spec_for(self, request: GenerateRequest) -> ModelSpec:
        """The configured model with the request's choices laid over it (never the last one used: as in
        docker-diffusers-api, what a request leaves out comes from the configuration, not from another request)."""
        base = self.default_spec
        if base is None:
            if not request.model:
                raise NoModelId("no model requested and no MODEL_ID configured")
            base = ModelSpec(model_id=request.model, precision=self.settings.model_precision)
        return base.for_request(request)

    # --- residency -------------------------------------------------------------------------------------------

    def _ensure(self, spec: ModelSpec, timings: dict[str, float] | None) -> LoadedModel:
        self._touch(spec)
        if spec in self._resident:
            self._resident.move_to_end(spec)
            return self._resident[spec]
        directory = fetch(spec, self.settings, timings)
        # Make room before loading (estimated from the files), so that two big models never meet on the GPU.
        self._make_room(estimate_bytes(directory, spec.precision))
        model = self._load(spec, directory)
        self._resident[spec] = model
        self._trim()  # the estimate was the files' size: correct it with what the weights really take
        return model

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used models (and control models) until `incoming` more bytes fit (without a
        budget: all the models)."""
        budget = self.settings.model_memory_budget
        if budget is None:
            while self._resident:
                self._evict(next(iter(self._resident)))
            return
        while self.resident_bytes() + incoming > budget and self._evict_oldest(keep=set()):
            pass

    def _trim(self, keep: frozenset[ControlSpec] = frozenset()) -> None:
        """Evict least recently used models and control models while over budget; the newest model always stays,
        and so do the control models in `keep` (those of the request being served)."""
        budget = self.settings.model_memory_budget
        if budget is None:
            while len(self._resident) > 1:
                self._evict(next(iter(self._resident)))
            while len(self._controls) > MAX_CONTROLS_KEPT:
                self._evict_control(next(iter(self._controls)))
            return
        newest = next(reversed(self._resident), None)
        while self.resident_bytes() > budget and self._evict_oldest(keep={newest, *keep}):
            pass

    def _touch(self, spec: ModelSpec | ControlSpec) -> None:
        self._clock += 1
        self._last_used[spec] = self._clock

    def _evict_oldest(self, keep: set[ModelSpec | ControlSpec | None]) -> bool:
        """Evict the least recently used model or control model not in `keep`; False when none is left."""
        candidates: list[ModelSpec | ControlSpec] = [*self._resident, *self._controls]
        candidates = [spec for spec in candidates if spec not in keep]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda spec: self._last_used.get(spec, 0))
        if isinstance(oldest, ControlSpec):
            self._evict_control(oldest)
        else:
            self._evict(oldest)
        return True

    def _evict_control(self, spec: ControlSpec) -> None:
        control = self._controls.pop(spec)
        self._last_used.pop(spec, None)
        log.info("evicting %s (%d bytes) to make room", spec.describe(), control.bytes)
        del control
        free_device_memory()

    # --- control models ----------------------------------------------------------------------------------------

    def controls(
        self, controls: list[ControlInput], model: LoadedModel, timings: dict[str, float] | None = None
    ) -> list[LoadedControl]:
        """The control models of a request, resident in `model`'s dtype on its device (loaded on first use, as
        RUNTIME_DOWNLOADS allows), each checked to fit its UNet. Records loadControl in `timings`."""
        started = time.perf_counter()
        transfers = _transfer_ms(timings)
        specs = [ControlSpec.of(control, model.dtype, model.device) for control in controls]
        try:
            with self._lock:
                loaded = [self._control(spec, timings) for spec in specs]
                self._trim(keep=frozenset(specs))
        finally:
            if timings is not None:
                elapsed = (time.perf_counter() - started) * 1000 - (_transfer_ms(timings) - transfers)
                timings["loadControl"] = round(timings.get("loadControl", 0.0) + elapsed, 2)
        unet = model.pipelines.components.get("unet")
        for control in loaded:
            if unet is not None:
                check_fits(control, unet)
        return loaded

    def _control(self, spec: ControlSpec, timings: dict[str, float] | None) -> LoadedControl:
        self._touch(spec)
        control = self._controls.get(spec)
        if control is not None:
            self._controls.move_to_end(spec)
            return control
        control = load_control(spec, fetch_control(spec, self.settings, timings))
        self._controls[spec] = control
        return control

    def _evict(self, spec: ModelSpec) -> None:
        model = self._resident.pop(spec)
        self._last_used.pop(spec, None)
        log.info("evicting %s (%d bytes) to make room", spec.describe(), model.bytes)
        del model
        free_device_memory()

    # --- loading ---------------------------------------------------------------------------------------------

    def _load(self, spec: ModelSpec, directory: Path) -> LoadedModel:
        from ..pipelines import ModelPipelines

        started = time.perf_counter()
        pipe = self._from_pretrained(spec, directory)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        elapsed = (time.perf_counter() - started) * 1000
        dtype = str(getattr(pipe, "dtype", "")).removeprefix("torch.")
        size = pipeline_bytes(pipe)
        log.info(
            "loaded %s from %s on %s (%s, %d bytes) in %.0f ms",
            spec.describe(),
            directory,
            self.device,
            dtype,
            size,
            elapsed,
        )
        source = spec.model_url or spec.checkpoint_url or str(directory)
        pipelines = ModelPipelines(pipe)
        pipelines.warm()
        return LoadedModel(spec, pipelines, self.device, dtype, source, elapsed, size)

    def _from_pretrained(self, spec: ModelSpec, directory: Path) -> Any:
        from diffusers import DiffusionPipeline

        kwargs: dict[str, Any] = {}
        if spec.precision:
            kwargs["dtype"] = torch_dtype(spec.precision)  # diffusers 0.42 deprecates torch_dtype=
        if spec.variant and not (spec.model_url or spec.checkpoint_url):
            kwargs["variant"] = spec.variant  # a cache entry was saved without variant suffixes
            _check_variant(spec, directory)
        try:
            return DiffusionPipeline.from_pretrained(directory, **kwargs)
        except (OSError, ValueError) as exc:
            if caused_by(exc, not_found_errors()):
                raise ModelNotFound(f"model {spec.describe()} not found: {exc}", requested=spec.model_id) from exc
            raise ModelLoadError(f"could not load {spec.describe()} from {directory}: {exc}") from exc

    # --- listing ---------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Resident models (most recently used first), models on disk, and the memory budget."""
        return {
            "loaded": [model.describe() for model in reversed(self.resident)],
            "cached": cached_models(self.settings.models_dir),
            **({"controls": [c.describe() for c in reversed(self.resident_controls)]} if self._controls else {}),
            "resident_bytes": self.resident_bytes(),
            "memory_budget": self.settings.model_memory_budget,
        }


def cached_models(models_dir: Path) -> list[dict[str, Any]]:
    """Published model directories in MODELS_DIR, and hub repositories in its hub cache."""
    found: list[dict[str, Any]] = []
    if models_dir.is_dir():
        for path in sorted(models_dir.iterdir()):
            if not path.name.startswith(".") and disk.is_published(path):
                found.append({"id": path.name, "source": "disk", "bytes": archive.directory_bytes(path)})
    hub = models_dir / "hub"
    if hub.is_dir():
        for path in sorted(hub.glob("models--*")):
            found.append({"id": path.name.removeprefix("models--").replace("--", "/"), "source": "hub"})
    return found


def _make_variant(
    base: LoadedModel, loras: list[tuple[Path, float, str]], embeddings: list[tuple[Path, str | None, str]]
) -> tuple[ModelPipelines, dict[str, Any], float]:
    """(the variant's pipelines, its own modules, milliseconds taken)."""
    import torch

    started = time.perf_counter()
    try:
        pipelines, own = base.pipelines.with_adapters(loras, embeddings)
    except torch.cuda.OutOfMemoryError as exc:
        free_device_memory()
        raise PipelineError(
            f"out of GPU memory copying the model for its LoRAs or embeddings: {exc}; lower LORA_VARIANTS_KEPT or "
            "MODEL_MEMORY_BUDGET"
        ) from exc
    return pipelines, own, (time.perf_counter() - started) * 1000


def _transfer_ms(timings: dict[str, float] | None) -> float:
    return sum(timings.get(name, 0.0) for name in TRANSFER_PHASES) if timings else 0.0


def _check_variant(spec: ModelSpec, directory: Path) -> None:
    """The model has weight files of the variant it is asked in (`<name>.<variant>.safetensors`): diffusers refuses
    one that it has none of with a ValueError, which was a MODEL_LOAD_ERROR (500) though the request was at fault."""
    marker = f".{spec.variant}."
    if not any(marker in path.name for path in directory.rglob("*") if path.is_file()):
        raise ModelNotFound(
            f"model {spec.describe()}: no weight files of variant {spec.variant!r} (named like "
            f"diffusion_pytorch_model.{spec.variant}.safetensors)",
            requested=spec.model_id,
        )
