"""Initialisation of fresh models: normal(0, std) for every matrix and embedding, ones for norm
weights, zeros for biases; seeded so that the same config and seed give the same model."""

from __future__ import annotations

import torch
from torch import nn

from upcycle.model.norm import RMSNorm


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, RMSNorm) or name.endswith("norm.weight"):
            parameter.fill_(1.0)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            values = torch.empty(parameter.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            parameter.copy_(values.to(parameter.dtype))
    return model
