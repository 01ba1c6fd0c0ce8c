"""Helpers for conversion tests: fp64 sources on disk, YAML files, logits comparisons."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from hf_models import build_hf_model, padded_batch

import upcycle


def fp64_source(folder: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny random HF model saved in float64 (so exactness can be tested at 1e-10)."""
    model = build_hf_model(family, seed=seed, **overrides).to(torch.float64)
    model.save_pretrained(folder)
    return folder


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def logits(folder: Path, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    model = upcycle.load_model(folder)
    if ids is None:
        ids, mask = padded_batch(model.config.vocab_size, seed=1)
    with torch.no_grad():
        return model(ids, mask).logits


def max_logit_diff(a: Path, b: Path) -> float:
    ids, mask = padded_batch(upcycle.load_config(a).vocab_size, seed=1)
    real = mask.bool()
    return (logits(a, ids, mask)[real] - logits(b, ids, mask)[real]).abs().max().item()
