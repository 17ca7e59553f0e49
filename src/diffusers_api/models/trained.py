"""Where training results kept in MODELS_DIR live: `trained/<name>` names a fine-tuned model directory
(MODELS_DIR/trained/<name>) or a LoRA (MODELS_DIR/loras/trained/<name>.safetensors)."""

from __future__ import annotations

from pathlib import Path

from ..schema.train import TRAINED_PREFIX, is_trained_name

__all__ = ["is_trained_name", "trained_lora_path", "trained_model_dir"]


def trained_model_dir(trained_id: str, models_dir: Path) -> Path:
    return models_dir / "trained" / trained_id.removeprefix(TRAINED_PREFIX)


def trained_lora_path(trained_id: str, models_dir: Path) -> Path:
    return models_dir / "loras" / "trained" / f"{trained_id.removeprefix(TRAINED_PREFIX)}.safetensors"
