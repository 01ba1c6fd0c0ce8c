"""Mixture of attention experts (MoA), BAM's soft-routed attention (methods.md §4.2).

Each query token t mixes E full attentions with a per-token gate over the same normalised input
u that the block gives the FFN (and its router):

    g(u_t) = softmax(W_r u_t) ∈ Δ^E,    A_t = Σ_j g_j(u_t) · MHA_j(u)_t

- `share_kv=False` (expert-KV, BAM's default): expert j has its own W_q, W_k, W_v, W_o.
- `share_kv=True` (shared-KV): one W_k, W_v for all experts, own W_q and W_o per expert.
The gate weights only the query token's output: keys and values are never gated.

Routing:
- `soft` (BAM): every token uses every expert; no load balancing needed.
- `topk` (ablation, BAM's top-1 / top-2 rows): softmax over all E, keep the k largest
  probabilities, *not* renormalised (Switch-style ST, as BAM's own FFN equation and methods.md
  §1.1; renormalising would make top-1 give the router no gradient). All E experts are still
  computed; the others get weight 0.
- Optional z-loss `coef · mean_t(logsumexp_j l_tj)²`, returned as aux key `moa_z_loss` (none is
  described for BAM's attention router; methods.md §9.4 recommends it optional, off by default).
The router is the FFN MoE's `Router` (no bias, N(0, 0.02²) init, logits and softmax in fp32, or
fp64 for fp64 inputs, outside autocast). The gate is cast to the activation dtype before it
multiplies the heads, as MoE layers cast their combine weights.

Parameter layout (under the block's `self_attn.`; N = H·Dh, Nk = Hk·Dh):

| name | expert-KV | shared-KV |
|---|---|---|
| `experts.q_proj` | [E, N, D] | [E, N, D] |
| `experts.k_proj`, `experts.v_proj` | [E, Nk, D] | [Nk, D] |
| `experts.o_proj` | [E, D, N] | [E, D, N] |
| `experts.{q,k,v}_proj_bias` (qkv_bias) | [E, N], [E, Nk] | [E, N], [Nk] |
| `experts.o_proj_bias` (o_bias) | [E, D] | [E, D] |
| `experts.q_norm.weight` (qk_norm) | [E, Dh] | [E, Dh] |
| `experts.k_norm.weight` (qk_norm) | [E, Dh] | [Dh] |
| `router.weight` | [E, D] | [E, D] |

Slice j of an expert tensor is exactly the HF tensor of dense source j (`q_proj.weight`, ...),
so `stack_attention_experts` is a stack (and a mean for the shared K/V, methods.md §9.3).

Two implementations give the same function: `eager`, a loop of E ordinary attentions (the
reference), and `wide` (`upcycle.kernels.wide_attention`), one attention with E·H query heads,
one QKV GEMM and one output GEMM; `auto` picks `wide`.

Shape letters: B batch, S sequence, D model width, E experts, K top-k, H query heads per expert,
Hk KV heads, Dh head width, X heads of one call (H per expert, E·H wide), Y KV heads of one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.kernels import wide_attention
from upcycle.kernels.wide_attention import WideLayout
from upcycle.model.attention import Attention, attend
from upcycle.model.config import ModelConfig
from upcycle.model.losses import router_z_loss
from upcycle.model.rope import apply_rope
from upcycle.model.router import Router

AuxLosses = dict[str, torch.Tensor]

# Dense `Attention` parameter name → (expert parameter name, belongs to the keys/values).
_DENSE_TO_EXPERT: dict[str, tuple[str, bool]] = {
    "q_proj.weight": ("q_proj", False),
    "k_proj.weight": ("k_proj", True),
    "v_proj.weight": ("v_proj", True),
    "o_proj.weight": ("o_proj", False),
    "q_proj.bias": ("q_proj_bias", False),
    "k_proj.bias": ("k_proj_bias", True),
    "v_proj.bias": ("v_proj_bias", True),
    "o_proj.bias": ("o_proj_bias", False),
    "q_norm.weight": ("q_norm.weight", False),
    "k_norm.weight": ("k_norm.weight", True),
}


class StackedNormWeight(nn.Module):
    """QK-norm weights of E experts [E, Dh] (or one shared [Dh]); applied by `MixtureOfAttention`.

    A module only so that the checkpoint name ends in `q_norm.weight`, like HF's, which
    `upcycle.model.init.init_weights` recognises as a norm weight (ones).
    """

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(*shape))


class AttentionExperts(nn.Module):
    """The stacked weights of E attention experts (layout in the module docstring); no forward."""

    def __init__(self, config: ModelConfig, num_experts: int, share_kv: bool) -> None:
        super().__init__()
        E, D = num_experts, config.hidden_size
        N = config.num_attention_heads * config.attention_head_dim
        Nk = config.kv_heads * config.attention_head_dim
        kv = () if share_kv else (E,)
        self.q_proj = nn.Parameter(torch.empty(E, N, D))
        self.k_proj = nn.Parameter(torch.empty(*kv, Nk, D))
        self.v_proj = nn.Parameter(torch.empty(*kv, Nk, D))
        self.o_proj = nn.Parameter(torch.empty(E, D, N))
        for optional in ("q_proj_bias", "k_proj_bias", "v_proj_bias", "o_proj_bias"):
            self.register_parameter(optional, None)
        self.q_norm = self.k_norm = None
        if config.qkv_bias:
            self.q_proj_bias = nn.Parameter(torch.empty(E, N))
            self.k_proj_bias = nn.Parameter(torch.empty(*kv, Nk))
            self.v_proj_bias = nn.Parameter(torch.empty(*kv, Nk))
        if config.o_bias:
            self.o_proj_bias = nn.Parameter(torch.empty(E, D))
        if config.qk_norm:
            self.q_norm = StackedNormWeight(E, config.attention_head_dim)
            self.k_norm = StackedNormWeight(*kv, config.attention_head_dim)
        self.reset_parameters()

    @property
    def q_norm_weight(self) -> torch.Tensor | None:
        return None if self.q_norm is None else self.q_norm.weight

    @property
    def k_norm_weight(self) -> torch.Tensor | None:
        return None if self.k_norm is None else self.k_norm.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As `nn.Linear` (uniform ±1/√fan_in, weights and biases) per expert; norm weights 1."""
        for weight, bias in (
            (self.q_proj, self.q_proj_bias),
            (self.k_proj, self.k_proj_bias),
            (self.v_proj, self.v_proj_bias),
            (self.o_proj, self.o_proj_bias),
        ):
            bound = weight.shape[-1] ** -0.5
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                nn.init.ones_(norm.weight)


class MixtureOfAttention(nn.Module):
    """E attention experts mixed per query token by a router (methods.md §4.2).

    `forward(u_BSD, cos_BSD, sin_BSD, mask_B1SS) -> (out_BSD, aux)` has the signature of the
    dense `Attention` plus the aux-loss dict the block merges. `gate_override` ([E], default
    None) replaces the router's gate for every token: a wiring-test hook (methods.md §7 F8).
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        moa = getattr(config, "moa", None)
        if moa is None:
            raise ValueError("MixtureOfAttention needs config.moa; set the moa section of the model config")
        self.layer_index = layer_index
        self.num_experts = moa.num_experts
        self.share_kv = moa.share_kv
        self.routing: Literal["soft", "topk"] = moa.routing
        self.z_loss_coef = moa.z_loss_coef
        self.implementation: Literal["eager", "wide"] = "eager" if moa.implementation == "eager" else "wide"
        self.layout = WideLayout(
            self.num_experts,
            config.num_attention_heads,
            config.kv_heads,
            config.attention_head_dim,
            self.share_kv,
        )
        self.norm_eps = config.rms_norm_eps
        self.experts = AttentionExperts(config, self.num_experts, self.share_kv)
        # The FFN MoE's router class: soft, or ST (softmax, then top-k, not renormalised).
        self.router = Router(
            config.hidden_size,
            self.num_experts,
            routing="soft" if self.routing == "soft" else "softmax_topk",
            top_k=moa.top_k or self.num_experts,
        )
        self.gate_override: torch.Tensor | None = None

    def route(self, u_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate [B, S, E] in the activation dtype (zero outside the top-k) and logits in ≥ fp32."""
        routing = self.router(u_BSD.flatten(0, 1))
        gate_TE = routing.probs_TE
        if self.routing == "topk":
            gate_TE = torch.zeros_like(gate_TE).scatter(-1, routing.indices_TK, routing.weights_TK)
        B, S, _ = u_BSD.shape
        return gate_TE.view(B, S, -1).to(u_BSD.dtype), routing.logits_TE.view(B, S, -1)

    def forward(
        self,
        u_BSD: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        mask_B1SS: torch.Tensor | None,
    ) -> tuple[torch.Tensor, AuxLosses]:
        gate_BSE, logits_BSE = self.route(u_BSD)
        if self.gate_override is not None:
            gate_BSE = self.gate_override.to(gate_BSE).expand_as(gate_BSE)
        mix = self._wide if self.implementation == "wide" else self._eager
        out_BSD = mix(u_BSD, gate_BSE, cos_BSD, sin_BSD, mask_B1SS)
        aux: AuxLosses = {}
        if self.z_loss_coef > 0:
            aux["moa_z_loss"] = router_z_loss(logits_BSE.flatten(0, 1), self.z_loss_coef)
        return out_BSD, aux

    def _eager(
        self,
        u_BSD: torch.Tensor,
        gate_BSE: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        mask_B1SS: torch.Tensor | None,
    ) -> torch.Tensor:
        """The reference: E ordinary attentions, each output scaled per token and summed."""
        ex, H, Dh = self.experts, self.layout.num_heads, self.layout.head_dim
        shared_kv = self._keys_values(u_BSD, None, cos_BSD, sin_BSD) if self.share_kv else None
        out_BSD = torch.zeros_like(u_BSD)
        for j in range(self.num_experts):
            q_BSHDh = F.linear(u_BSD, ex.q_proj[j], _slice(ex.q_proj_bias, j)).unflatten(-1, (H, Dh))
            q_BHSDh = self._norm_and_rope(q_BSHDh, _slice(ex.q_norm_weight, j), cos_BSD, sin_BSD)
            k_BHSDh, v_BHSDh = shared_kv or self._keys_values(u_BSD, j, cos_BSD, sin_BSD)
            heads_BHSDh = attend(q_BHSDh, k_BHSDh, v_BHSDh, mask_B1SS)
            heads_BSN = heads_BHSDh.transpose(1, 2).flatten(2)
            out_j_BSD = F.linear(heads_BSN, ex.o_proj[j], _slice(ex.o_proj_bias, j))
            out_BSD = out_BSD + gate_BSE[..., j, None] * out_j_BSD
        return out_BSD

    def _keys_values(
        self, u_BSD: torch.Tensor, expert: int | None, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [B, Hk, S, Dh] of one expert (None: the shared K/V)."""
        ex, Hk, Dh = self.experts, self.layout.num_kv_heads, self.layout.head_dim
        k_BSHDh = F.linear(u_BSD, _slice(ex.k_proj, expert), _slice(ex.k_proj_bias, expert))
        v_BSHDh = F.linear(u_BSD, _slice(ex.v_proj, expert), _slice(ex.v_proj_bias, expert))
        k_BHSDh = self._norm_and_rope(
            k_BSHDh.unflatten(-1, (Hk, Dh)), _slice(ex.k_norm_weight, expert), cos_BSD, sin_BSD
        )
        return k_BHSDh, v_BSHDh.unflatten(-1, (Hk, Dh)).transpose(1, 2)

    def _wide(
        self,
        u_BSD: torch.Tensor,
        gate_BSE: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        mask_B1SS: torch.Tensor | None,
    ) -> torch.Tensor:
        """The fast path: one QKV GEMM, one SDPA call with E·H query heads, one output GEMM."""
        ex, layout = self.experts, self.layout
        E, H, Hk, Dh = layout.num_experts, layout.num_heads, layout.num_kv_heads, layout.head_dim
        q_BSXDh, k_BSYDh, v_BSYDh = wide_attention.project_qkv(
            u_BSD, ex.q_proj, ex.k_proj, ex.v_proj, ex.q_proj_bias, ex.k_proj_bias, ex.v_proj_bias, layout
        )
        q_norm_XDh = k_norm_YDh = None
        if ex.q_norm_weight is not None and ex.k_norm_weight is not None:
            q_norm_XDh = layout.to_wide_heads(ex.q_norm_weight[:, None].expand(E, H, Dh), 0)
            k_norm = ex.k_norm_weight
            k_norm_YDh = layout.to_wide_kv_heads(
                k_norm if self.share_kv else k_norm[:, None].expand(E, Hk, Dh), 0
            )
        q_BXSDh = self._norm_and_rope(q_BSXDh, q_norm_XDh, cos_BSD, sin_BSD)
        k_BYSDh = self._norm_and_rope(k_BSYDh, k_norm_YDh, cos_BSD, sin_BSD)
        heads_BXSDh = attend(q_BXSDh, k_BYSDh, v_BSYDh.transpose(1, 2), mask_B1SS)
        return wide_attention.gate_and_project_out(heads_BXSDh, gate_BSE, ex.o_proj, ex.o_proj_bias, layout)

    def _norm_and_rope(
        self,
        x_BSXDh: torch.Tensor,
        norm_weight: torch.Tensor | None,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
    ) -> torch.Tensor:
        """Optional per-head QK-norm (as `RMSNorm`), then RoPE; returns [B, X, S, Dh]."""
        if norm_weight is not None:
            x_fp32 = x_BSXDh.to(torch.float32)
            normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.norm_eps)
            x_BSXDh = norm_weight * normed.to(x_BSXDh.dtype)
        return apply_rope(x_BSXDh.transpose(1, 2), cos_BSD, sin_BSD)

    @classmethod
    def from_dense(
        cls,
        config: ModelConfig,
        attentions: Sequence[Attention],
        layer_index: int = 0,
        kv_init: Literal["mean", "seed"] = "mean",
    ) -> MixtureOfAttention:
        """An MoA layer whose expert j is dense attention j; the router stays freshly random.

        Built on the device and dtype of the sources. Shared-KV follows `config.moa.share_kv`.
        """
        first = attentions[0].q_proj.weight
        moa = cls(config, layer_index).to(device=first.device, dtype=first.dtype)
        if len(attentions) != moa.num_experts:
            raise ValueError(
                f"from_dense got {len(attentions)} attentions for {moa.num_experts} experts; "
                "pass one dense attention per expert (moa.num_experts)"
            )
        state = stack_attention_experts([a.state_dict() for a in attentions], moa.share_kv, kv_init)
        moa.experts.load_state_dict(state)
        return moa


def stack_attention_experts(
    sources: Sequence[Mapping[str, torch.Tensor]],
    share_kv: bool,
    kv_init: Literal["mean", "seed"] = "mean",
) -> dict[str, torch.Tensor]:
    """Dense attention tensors of E sources → the expert tensors of one MoA layer.

    `sources[j]` maps dense names (`q_proj.weight`, `k_proj.bias`, `q_norm.weight`, ...: the
    HF names under `self_attn.`) to tensors; the result maps expert names (`q_proj`,
    `k_proj_bias`, `q_norm.weight`, ...: under `self_attn.experts.`) to stacked tensors. With
    `share_kv`, K/V tensors (and `k_norm`) are the mean over the sources (`kv_init="mean"`,
    methods.md §9.3), computed in ≥ fp32, or those of source 0, the seed (`kv_init="seed"`).
    """
    names = set(sources[0])
    for index, source in enumerate(sources):
        if set(source) != names:
            raise ValueError(
                f"attention source {index} has tensors {sorted(source)}, source 0 has {sorted(names)}; "
                "all sources must come from the same architecture"
            )
    unknown = names - set(_DENSE_TO_EXPERT)
    if unknown:
        raise ValueError(
            f"unknown attention tensors {sorted(unknown)}; expected names from {list(_DENSE_TO_EXPERT)}"
        )
    stacked: dict[str, torch.Tensor] = {}
    for dense_name, (expert_name, is_kv) in _DENSE_TO_EXPERT.items():
        if dense_name not in names:
            continue
        tensors = [source[dense_name] for source in sources]
        if is_kv and share_kv:
            stacked[expert_name] = tensors[0].clone() if kv_init == "seed" else _mean(tensors)
        else:
            stacked[expert_name] = torch.stack(tensors)
    return stacked


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    dtype = tensors[0].dtype
    accumulate = torch.promote_types(dtype, torch.float32)
    return torch.stack([t.to(accumulate) for t in tensors]).mean(0).to(dtype)


def _slice(t: torch.Tensor | None, index: int | None) -> torch.Tensor | None:
    """Expert `index` of a stacked tensor; a shared tensor (index None) or a missing one as is."""
    return t if t is None or index is None else t[index]
