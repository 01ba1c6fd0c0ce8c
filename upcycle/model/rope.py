"""Rotary position embeddings (RoPE) with `default`, `linear` and `llama3` frequency scaling.

Cos/sin tables are computed on the fly from the positions (O(B·S·Dh), negligible next to
attention) instead of being stored as buffers: no state to load, nothing that breaks when a
model is built on the meta device. The rotation is the "rotate half" convention of the HF Llama
family (pairs are (i, i + Dh/2)), so checkpoints need no permutation.

Shape letters: B batch, S sequence, H heads, Dh head width.
"""

from __future__ import annotations

import math

import torch

from upcycle.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-pair angular frequencies [Dh/2] in fp32, after the configured scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    assert rope.original_max_position_embeddings is not None  # checked by RopeConfig
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    rope: RopeConfig, head_dim: int, positions_BS: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [B, S, Dh], computed in fp32 and cast to `dtype`."""
    inv_freq = inverse_frequencies(rope, head_dim, positions_BS.device)
    angles_BSh = positions_BS.to(torch.float32)[:, :, None] * inv_freq[None, None, :]
    angles_BSD = torch.cat((angles_BSh, angles_BSh), dim=-1)
    return angles_BSD.cos().to(dtype), angles_BSD.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x_BHSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys [B, H, S, Dh] by the position tables [B, S, Dh]."""
    cos = cos_BSD[:, None]
    sin = sin_BSD[:, None]
    return x_BHSD * cos + _rotate_half(x_BHSD) * sin
