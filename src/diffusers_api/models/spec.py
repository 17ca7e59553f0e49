"""ModelSpec: everything that names one set of weights in one precision, and how a request overrides it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .locations import normalized_id

if TYPE_CHECKING:
    from ..config import Settings
    from ..schema import GenerateRequest


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
    # LoRAs fused into the model (url, scale), in the request's order; () for the model itself (see models/lora.py)
    loras: tuple[tuple[str, float], ...] = ()

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
        """This spec with the request's choices laid over it. A new model id starts from a clean slate; LoRAs are
        the request's own, never inherited."""
        base = self if request.model in (None, self.model_id) else ModelSpec(model_id=request.model or "")
        asked = {
            "hf_model_id": request.hf_model_id,
            "revision": request.revision,
            "variant": request.variant,
            "precision": request.precision,
            "model_url": request.model_url,
            "checkpoint_url": request.checkpoint_url,
        }
        loras = tuple((lora.url, 1.0 if lora.scale is None else lora.scale) for lora in request.lora_weights or ())
        return dataclasses.replace(base, **{k: v for k, v in asked.items() if v is not None}, loras=loras)

    @property
    def without_loras(self) -> ModelSpec:
        return dataclasses.replace(self, loras=())

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
        parts += [f"lora={url}@{scale:g}" for url, scale in self.loras]
        return " ".join(parts)

    @property
    def normalized_id(self) -> str:
        """Its name on disk and in the cloud cache (see locations.normalized_id)."""
        return normalized_id(self.model_id, self.revision, self.variant, self.precision)
