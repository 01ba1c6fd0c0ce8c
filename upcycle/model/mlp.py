"""The dense feed-forward network: gated (SwiGLU and kin) as in Llama, Mistral and Qwen.

`down(act(gate(x)) * up(x))`. The activation is chosen by name so that the same module and the
MoE experts (which reuse `activation_fn`) cover SwiGLU, GeGLU and squared-ReLU sources.

Shape letters: T tokens (any leading shape), D model width, F FFN width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": _relu2,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) ⊙ up(x)); tensor names follow HF (`gate_proj`, `up_proj`, `down_proj`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation_fn(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x_TD)) * self.up_proj(x_TD))
