"""Checkpoints: lazy safetensors reading, streaming atomic writing, architecture adapters,
the native format and loading."""

from upcycle.checkpoint.loading import load_config, load_model
from upcycle.checkpoint.native import save_native

__all__ = ["load_config", "load_model", "save_native"]
