"""A model resident on the device: its pipelines, where it came from, what it weighs, its adapter variants."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .sources import PRECISIONS
from .spec import ModelSpec

if TYPE_CHECKING:
    from ..pipelines import ModelPipelines
    from .ip_adapter import IPAdapterSpec, IPAdapterVariant


@dataclass
class LoadedModel:
    spec: ModelSpec
    pipelines: ModelPipelines
    device: str
    dtype: str
    source: str
    load_ms: float
    bytes: int = 0  # of its own weights (a variant: the modules it copied)
    # variants of this model with adapters (LoRAs, textual inversions), least recently used first; they share its
    # other components and go with it
    variants: OrderedDict[ModelSpec, LoadedModel] = field(default_factory=OrderedDict)
    # this model with an IP-Adapter (models/ip_adapter.py), least recently used first; they go with it
    ip_adapters: OrderedDict[IPAdapterSpec, IPAdapterVariant] = field(default_factory=OrderedDict)

    @property
    def precision(self) -> str:
        """fp16, bf16 or fp32: the one spelling of MODEL_PRECISION, also where the model loaded in its own dtype."""
        return self.spec.precision or PRECISIONS.get(self.dtype, self.dtype)

    @property
    def total_bytes(self) -> int:
        adapters = sum(variant.bytes for variant in self.ip_adapters.values())
        return self.bytes + adapters + sum(variant.total_bytes for variant in self.variants.values())

    def describe(self) -> dict[str, Any]:
        loras, embeddings = self.spec.adapters_json()
        return {
            "model_id": self.spec.model_id,
            "id": self.spec.normalized_id,
            "precision": self.precision,
            "device": self.device,
            "bytes": self.bytes,
            "source": self.source,
            "load_ms": round(self.load_ms, 2),
            **({"loras": loras} if loras else {}),
            **({"textual_inversions": embeddings} if embeddings else {}),
            **({"variants": [variant.describe() for variant in self.variants.values()]} if self.variants else {}),
            **({"ip_adapters": [ip.describe() for ip in self.ip_adapters.values()]} if self.ip_adapters else {}),
        }
