"""`sparse`: Sparse Upcycling (Komatsuzaki et al. 2022), methods.md §2.

Every expert of an MoE layer is an exact copy of that layer's dense FFN; a new router is drawn
(N(0, 0.02²), seeded; `router_init.std: 0` gives a zero router); everything else is copied
bit for bit. Defaults: 8 experts, topK-then-softmax (TS) top-2, MoE in every layer
(`moe_layers: every_other` gives the paper's "half the MLPs", §9.17).

Exactness (methods.md §7): TS with any k, or soft routing, reproduces the dense model exactly
(F1, F2). ST without renormalisation multiplies the FFN output by the sum of the selected
probabilities (N1); with a zero router that sum is k/N, which `down_scale: N/k` undoes exactly
(F3, a test mode).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from upcycle.recipes.base import FFN_MATRIX, MoEParams, SourceModel, UpcycleRecipe, dense_ffn_matrix
from upcycle.recipes.registry import register


class SparseParams(MoEParams):
    num_experts: int | None = Field(8, gt=0)
    down_scale: float = Field(1.0, gt=0, description="multiplies every expert's W_down (F3 test mode: N/k)")


@register
class SparseUpcycling(UpcycleRecipe):
    name = "sparse"
    paper = "Komatsuzaki et al. 2022, Sparse Upcycling, https://arxiv.org/abs/2212.05055"
    summary = "copy the dense FFN into N experts, add a new router (TS top-2 by default)"
    Params: ClassVar = SparseParams

    def expert_source(self, layer: int, which: FFN_MATRIX, expert: int) -> SourceModel | None:
        return None if which == "down" and self.params.down_scale != 1.0 else self.seed

    def expert_matrix(self, layer: int, which: FFN_MATRIX, expert: int) -> torch.Tensor:
        matrix = dense_ffn_matrix(self.seed, layer, which)
        if which == "down" and self.params.down_scale != 1.0:
            return matrix * self.params.down_scale
        return matrix
