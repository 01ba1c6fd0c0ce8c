"""`autocast_dtype`: the dtype a matrix product with a tensor runs in.

Shared by the MoE layer (its experts compute in this dtype: `torch._grouped_mm` is not on
autocast's cast lists, so the layer casts itself) and the wide attention (its concatenated
weights are written directly in this dtype, so autocast has nothing left to cast).
"""

from __future__ import annotations

import torch


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on for `x`'s device and `x` is floating, else `x`'s own."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
