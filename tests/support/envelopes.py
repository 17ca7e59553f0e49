"""The request every test of the legacy API sends: docker-diffusers-api's README example, on the tiny model."""

from __future__ import annotations

from typing import Any


def grass(steps: int = 20, call_inputs: dict[str, Any] | None = None, **model_inputs: Any) -> dict[str, Any]:
    """A `{"modelInputs", "callInputs"}` envelope for a 64x64 "realistic field of grass" on builtin/tiny-sd."""
    inputs = {"prompt": "realistic field of grass", "num_inference_steps": steps, "width": 64, "height": 64}
    return {"modelInputs": inputs | model_inputs, "callInputs": {"MODEL_ID": "builtin/tiny-sd"} | (call_inputs or {})}


GRASS = grass()
