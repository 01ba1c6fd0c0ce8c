"""`nvidia`: granular upcycling with virtual groups and weight scaling (He et al. 2024), methods.md §5.

With granularity G the dense FFN of width F is cut into G contiguous shards S_0..S_{G-1} of
width F/G, and the N = E·G experts are E copies of those G shards: expert e is shard
g = e mod G of copy c = ⌊e/G⌋ (§5.2). W_gate and W_up are sharded separately, row slices S_g
of each, for every gated activation (§9.19: Megatron shards the fused [gate; up] across the
boundary unless the activation is SiLU); W_down is sharded by columns.

Virtual groups (§5.2): the router draws E = N/G fresh rows and repeats each G times
consecutively, so the G shards of one copy always have equal logits and top-k with k = m·G
selects m whole copies. `virtual_groups: false` draws N independent rows (the N3 ablation).

Weight scaling (§5.3, §9.14, §9.15). The output scale s makes up for the routing weights:
s = N·G/k for softmax-then-topK (ST, each expert's probability ≈ 1/N and the k experts form
k/G copies), s = G for topK-then-softmax (TS: the weights sum to 1 and spread over G shards),
for ST with `renormalize`, and for `soft` routing (ST with k = N). `weight_scaling`:
- `balanced` (default, Megatron): every matrix of every expert times a = s^(1/d), where d is
  the degree of positive homogeneity of the expert in its weights: a gated expert has degree
  d_act + 2 and a non-gated one d_act + 1, with d_act = 2 for squared ReLU, else 1. This gives
  Megatron's cube root for GLUs and squared ReLU and its square root for other non-gated
  activations. Deviation: a *gated* squared ReLU (which Megatron never meets) gets s^(1/4),
  its true degree, rather than Megatron's GLU cube root, so that it stays exact under TS.
- `down_only`: the whole s on W_down (exact under TS with k = m·G for any activation, F4).
- `none`: no scaling (shards sum back to the dense FFN bit for bit).
The router is never scaled. Expert tensors are computed in fp32 (fp64 for fp64 sources).

Defaults: G = 1, N = 8·G, ST routing (the paper's recommendation, §5.4), Switch aux loss with
α = 0.01 (all the paper's runs), no z-loss, dropless. top_k defaults to 2·G: for G = 1 this is
the paper's best model E8G1T2; for G > 1 it keeps twice the dense FFN's active compute at every
granularity (E8G8T16 beat E8G8T8, §5.6) and is a multiple of G, as virtual groups need. The
iso-FLOP E8G8T8 of the paper is `granularity: 8, top_k: 8`.

Exactness (§7): TS with k = m·G and `down_only` is exact for any activation, `balanced` only
for positively homogeneous ones (ReLU family, F4); on SwiGLU/GeGLU `balanced` is approximate
(N4). ST is never exact with a random router (N1); with a zero router and G = 1, ST gives
(k/N)·FFN unscaled and FFN exactly with `down_only` (F3). k not a multiple of G is refused; no
virtual groups breaks the function (N3).

Shape letters: N experts, E copies (N/G), G granularity, F dense width, D model width.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from upcycle.errors import UpcycleError
from upcycle.model.config import MoEConfig
from upcycle.recipes.base import (
    FFN_MATRIX,
    MoEParams,
    UpcycleRecipe,
    compute_dtype,
    dense_ffn_matrix,
    new_router,
)
from upcycle.recipes.registry import register

WeightScaling = Literal["balanced", "down_only", "none"]


class NvidiaParams(MoEParams):
    granularity: int = Field(1, gt=0, description="G: shards per dense FFN; experts have width F/G")
    num_experts: int | None = Field(None, gt=0, description="N = E·G routed experts; default 8·G")
    top_k: int | None = Field(None, gt=0, description="experts per token; default 2·G")
    routing: Literal["topk_softmax", "softmax_topk", "soft", "sample_top1"] = "softmax_topk"
    weight_scaling: WeightScaling = Field("balanced", description="balanced | down_only | none (§5.3)")
    virtual_groups: bool = Field(True, description="repeat each router row over the G shards of a copy")


def output_scale(routing: str, renormalize: bool, num_experts: int, granularity: int, top_k: int) -> float:
    """s, the factor the MoE output needs at initialisation (methods.md §5.3, §9.14).

    ST: N·G/k; TS, renormalised ST: G; soft routing is ST with k = N, hence G as well.
    """
    if routing == "soft" or (routing == "softmax_topk" and renormalize) or routing == "topk_softmax":
        return float(granularity)
    return num_experts * granularity / top_k


def homogeneity_degree(activation: str, gated: bool) -> int:
    """d with expert(a·W) ≈ a^d · expert(W): a^d_act from the activation, one a per other matrix."""
    activation_degree = 2 if activation == "relu2" else 1
    return activation_degree + (2 if gated else 1)


def matrix_factors(
    mode: WeightScaling, scale: float, activation: str, gated: bool = True
) -> dict[FFN_MATRIX, float]:
    """The factor each expert matrix is multiplied by, for one output scale s (methods.md §5.3)."""
    if mode == "none":
        return {"gate": 1.0, "up": 1.0, "down": 1.0}
    if mode == "down_only":
        return {"gate": 1.0, "up": 1.0, "down": scale}
    per_matrix = scale ** (1.0 / homogeneity_degree(activation, gated))
    return {"gate": per_matrix if gated else 1.0, "up": per_matrix, "down": per_matrix}


def shard(matrix: torch.Tensor, which: FFN_MATRIX, index: int, count: int) -> torch.Tensor:
    """Shard `index` of `count` contiguous slices along the FFN width (rows of gate/up, columns of down)."""
    width = (matrix.shape[1] if which == "down" else matrix.shape[0]) // count
    part = slice(index * width, (index + 1) * width)
    return matrix[:, part] if which == "down" else matrix[part]


@register
class NvidiaUpcycling(UpcycleRecipe):
    name = "nvidia"
    paper = "He et al. 2024, Upcycling Large Language Models into Mixture of Experts, https://arxiv.org/abs/2410.07524"
    summary = "G shards of the dense FFN × E copies, virtual-group router, weight scaling (ST by default)"
    Params: ClassVar = NvidiaParams

    def __init__(self, params: NvidiaParams, sources) -> None:
        G = params.granularity
        resolved = params.model_copy(
            update={"num_experts": params.num_experts or 8 * G, "top_k": params.top_k or 2 * G}
        )
        super().__init__(resolved, sources)
        self.factors = matrix_factors(
            resolved.weight_scaling, self.scale(), self.seed.config.hidden_act, self.target.moe.gated
        )

    def granularity(self) -> int:
        return self.params.granularity

    def scale(self) -> float:
        p = self.params
        return output_scale(p.routing, p.renormalize, self.num_experts(), p.granularity, p.top_k)

    def check_layout(self) -> None:
        """Refuse what the construction cannot build or cannot keep exact (§5.2, §9.14)."""
        p, N, G = self.params, self.num_experts(), self.granularity()
        F = self.seed.config.intermediate_size
        if p.routing == "sample_top1":
            raise UpcycleError(
                "recipe nvidia has no weight-scaling rule for sample_top1; use routing softmax_topk, "
                "topk_softmax or soft"
            )
        if N % G:
            raise UpcycleError(
                f"num_experts ({N}) must be a multiple of granularity ({G}), since N = E·G; change one of them"
            )
        if F % G:
            raise UpcycleError(
                f"granularity ({G}) must divide the dense intermediate_size ({F}); pick a divisor of {F}"
            )
        if p.routing == "soft":
            return
        if p.top_k > N:
            raise UpcycleError(f"top_k ({p.top_k}) exceeds num_experts ({N}); lower top_k or add experts")
        if p.virtual_groups and p.top_k % G:
            raise UpcycleError(
                f"with virtual groups top_k ({p.top_k}) must be a multiple of granularity ({G}) to select "
                f"whole copies of the FFN; set top_k to a multiple of {G}"
            )

    def moe_section(self) -> MoEConfig:
        self.check_layout()
        section = super().moe_section().model_dump()
        section["granularity"] = self.granularity()
        section["intermediate_size"] = self.seed.config.intermediate_size // self.granularity()
        return MoEConfig.model_validate(section)

    def expert_matrix(self, layer: int, which: FFN_MATRIX, expert: int) -> torch.Tensor:
        """Shard g = e mod G of the dense matrix, times its factor; the copy index does not matter
        here, only in the router."""
        G = self.granularity()
        dense = dense_ffn_matrix(self.seed, layer, which)
        part = shard(dense, which, expert % G, G).to(compute_dtype(dense.dtype), copy=True)
        factor = self.factors[which]
        return part if factor == 1.0 else part.mul_(factor)

    def router(self, layer: int) -> torch.Tensor:
        N, G, D = self.num_experts(), self.granularity(), self.target.hidden_size
        if not self.params.virtual_groups:
            return new_router(self.params.router_init, layer, N, D)
        copies_ED = new_router(self.params.router_init, layer, N // G, D)
        return copies_ED.repeat_interleave(G, dim=0)  # row e = copies_ED[e // G]
