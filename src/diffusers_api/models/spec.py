"""ModelSpec: everything that names one set of weights in one precision, and how a request overrides it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    checkpoint_config_url: str | None = None  # the original-SD .yaml that converts checkpoint_url
    # What a request adds (models/adapters.py), in its order; () for the model itself:
    loras: tuple[tuple[str, float], ...] = ()  # LoRAs fused into it: (url, scale)
    embeddings: tuple[tuple[str, str | None], ...] = ()  # textual inversions: (url, token)

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
            checkpoint_config_url=settings.checkpoint_config_url,
        )

    def for_request(self, request: GenerateRequest) -> ModelSpec:
        """This spec with the request's choices laid over it. A new model id starts from a clean slate but for the
        precision, the server's choice for every model; adapters (LoRAs, textual inversions) are the request's own,
        never inherited."""
        same = request.model in (None, self.model_id)
        base = self if same else ModelSpec(model_id=request.model or "", precision=self.precision)
        asked = {
            "hf_model_id": request.hf_model_id,
            "revision": request.revision,
            "variant": request.variant,
            "precision": request.precision,
            "model_url": request.model_url,
            "checkpoint_url": request.checkpoint_url,
            "checkpoint_config_url": request.checkpoint_config_url,
        }
        loras = tuple((lora.url, 1.0 if lora.scale is None else lora.scale) for lora in request.lora_weights or ())
        embeddings = tuple((item.url, item.token) for item in request.textual_inversions or ())
        chosen = {k: v for k, v in asked.items() if v is not None}
        return dataclasses.replace(base, **chosen, loras=loras, embeddings=embeddings)

    @property
    def has_adapters(self) -> bool:
        return bool(self.loras or self.embeddings)

    @property
    def without_adapters(self) -> ModelSpec:
        return dataclasses.replace(self, loras=(), embeddings=())

    def adapters_json(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(LoRAs, textual inversions) as responses and the model list show them."""
        loras = [{"url": url, "scale": scale} for url, scale in self.loras]
        return loras, [{"url": url, "token": token} for url, token in self.embeddings]

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
        parts += [f"embedding={url}" + (f"@{token}" if token else "") for url, token in self.embeddings]
        return " ".join(parts)

    @property
    def normalized_id(self) -> str:
        """Its name on disk and in the cloud cache (see locations.normalized_id)."""
        return normalized_id(self.model_id, self.revision, self.variant, self.precision)
