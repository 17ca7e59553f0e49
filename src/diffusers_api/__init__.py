"""diffusers-api: a fast, safe inference server for Hugging Face diffusers image models."""

__version__ = "0.1.0"

__all__ = ["__version__"]
