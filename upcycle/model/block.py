"""Transformer blocks: `sequential` (Llama: attention, then FFN, each with its own norm) and
`parallel` (GPT-J / Cohere / BAM: x + Attn(norm x) + FFN(norm x), one shared norm).

A block owns an attention part and an FFN part built by `upcycle.model.parts`, so dense, MoE and
attention-expert parts combine freely. Each part returns its output and a dict of auxiliary
losses (empty for dense parts); the block merges them so that the model can hand every MoE
layer's losses to the trainer.

Shape letters: B batch, S sequence, D model width.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.model.attention import Attention
from upcycle.model.config import ModelConfig
from upcycle.model.mlp import GatedMLP
from upcycle.model.norm import RMSNorm

AuxLosses = dict[str, torch.Tensor]


def build_attention(config: ModelConfig, layer_index: int) -> nn.Module:
    """Dense attention, or BAM's attention experts in the layers `moa.layers` selects."""
    if config.is_moa_layer(layer_index):
        from upcycle.model.moa import MixtureOfAttention  # imported here: a dense model never needs it

        return MixtureOfAttention(config, layer_index)
    return Attention(config)


def build_ffn(config: ModelConfig, layer_index: int) -> nn.Module:
    """Dense gated MLP, or the MoE layer in the layers `moe.layers` selects (methods.md §9.17)."""
    if config.is_moe_layer(layer_index):
        from upcycle.model.moe import MoE  # imported here, like MoA, to keep the block's imports dense

        return MoE(config, layer_index)
    return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)


def _call_part(part: nn.Module, *args: torch.Tensor | None) -> tuple[torch.Tensor, AuxLosses]:
    out = part(*args)
    return out if isinstance(out, tuple) else (out, {})


class Block(nn.Module):
    """One layer; parameter names match HF Llama (`input_layernorm`, `self_attn`, `mlp`, ...)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.parallel = config.block == "parallel"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = (
            None if self.parallel else RMSNorm(config.hidden_size, config.rms_norm_eps)
        )
        self.self_attn = build_attention(config, layer_index)
        self.mlp = build_ffn(config, layer_index)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        mask_B1SS: torch.Tensor | None,
    ) -> tuple[torch.Tensor, AuxLosses]:
        normed_BSD = self.input_layernorm(x_BSD)
        attn_BSD, attn_aux = _call_part(self.self_attn, normed_BSD, cos_BSD, sin_BSD, mask_B1SS)
        if self.parallel:
            ffn_BSD, ffn_aux = _call_part(self.mlp, normed_BSD)
            return x_BSD + attn_BSD + ffn_BSD, {**attn_aux, **ffn_aux}
        h_BSD = x_BSD + attn_BSD
        ffn_BSD, ffn_aux = _call_part(self.mlp, self.post_attention_layernorm(h_BSD))
        return h_BSD + ffn_BSD, {**attn_aux, **ffn_aux}
