"""Wide attention: E attention experts computed as one attention with E·H query heads.

The fast path of `upcycle.model.moa.MixtureOfAttention` (methods.md §4.2, "Efficient
implementation"). Soft routing only gates each *query* token's contribution, and softmax
attention is computed per head, so a mixture of E attentions is one attention whose heads are all
the experts' heads:

    A_t = Σ_j g_j(u_t) · W_o^j · concat_h head_{j,h}(t)  =  [W_o^1 … W_o^E] · concat_{j,h} g_j(u_t) · head_{j,h}(t)

This file holds what differs from a dense attention: the head layout and the two wide GEMMs.

1. `project_qkv`: every expert's Q, K and V. With expert-KV (and no biases) the wide head order
   is the parameters' own row order, so Q, K and V are three GEMMs on views of the weights;
   otherwise one GEMM with the weights concatenated (and Q's rows permuted for shared-KV).
2. (the caller normalises, rotates and calls SDPA once with E·H query heads)
3. `gate_and_project_out`: multiply the heads of expert j at position t by g_j(u_t)
   (`upcycle.kernels.combine.scale_rows`, whose backward is one pass on the GPU), then one
   GEMM with the concatenated output projections [W_o^1 … W_o^E].

Head order. SDPA's grouped-query convention (`enable_gqa`, and the kernels behind it) is that
query head i reads KV head i // (Hq / Hkv): consecutive query heads share a KV head.
- Expert-KV: queries expert-major (wide head e·H + h) and keys/values expert-major (e·Hk + k).
  Then (e·H + h) // (H/Hk) = e·Hk + h // (H/Hk): every query head meets its own expert's KV head,
  and nothing needs reordering.
- Shared-KV: Hk KV heads serve E·H query heads, so one group has E·H/Hk consecutive query heads.
  Expert e's head h must read KV head h // r (r = H/Hk), hence the order is KV-group major:
  [Hk, E, r], wide head (h // r)·E·r + e·r + h % r. The weight rows of W_q and the columns of
  W_o are permuted into this order when they are concatenated, so the activations never are.

Where they are needed, the concatenated weights are built once per call (E·(H + 2·Hk)·Dh·D
elements): small next to the GEMMs for any realistic token count, and it keeps the parameters in
their natural per-expert layout for checkpoints and recipes. Each is one pass (`_wide_weight`): the
permuted parameter is copied straight into its rows of the wide matrix, already in the dtype the
GEMM runs in (autocast's, for fp32 master weights), rather than permuted into a temporary,
concatenated and cast by autocast, which read and wrote the weights up to three times.

Shape letters: B batch, S sequence, D model width, E experts, H query heads per expert, Hk KV
heads per expert (or shared), Dh head width, X wide query heads (E·H), Y wide KV heads (E·Hk for
expert-KV, Hk for shared-KV), N a flattened projection width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from upcycle.kernels.combine import scale_rows
from upcycle.kernels.dtypes import autocast_dtype


@dataclass(frozen=True)
class WideLayout:
    """How E experts' heads are laid side by side in one wide attention."""

    num_experts: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    share_kv: bool

    @property
    def group_size(self) -> int:
        """Query heads per KV head inside one expert (r = H / Hk)."""
        return self.num_heads // self.num_kv_heads

    @property
    def wide_heads(self) -> int:
        return self.num_experts * self.num_heads

    @property
    def wide_kv_heads(self) -> int:
        return self.num_kv_heads if self.share_kv else self.num_experts * self.num_kv_heads

    def to_wide_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """[..., E, H, ...] (E at `dim` ≥ 0, H next) → [..., E·H, ...] in wide query-head order."""
        if not self.share_kv:
            return t.flatten(dim, dim + 1)
        t_EHkr = t.unflatten(dim + 1, (self.num_kv_heads, self.group_size))  # [..., E, Hk, r, ...]
        return t_EHkr.movedim(dim + 1, dim).flatten(dim, dim + 2)  # [..., Hk·E·r, ...]

    def to_wide_kv_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Per-expert KV tensor [..., E, Hk, ...] → [..., E·Hk, ...]; shared tensors pass through."""
        return t if self.share_kv else t.flatten(dim, dim + 1)

    def per_expert_view(self, wide: torch.Tensor, dim: int) -> torch.Tensor:
        """A view [..., E, Hk, r, ...] of a tensor [..., X, ...] in wide query-head order (the
        inverse of `to_wide_heads`, as a view: writing into it fills the wide tensor)."""
        E, Hk, r = self.num_experts, self.num_kv_heads, self.group_size
        if not self.share_kv:
            return wide.unflatten(dim, (E, Hk, r))
        return wide.unflatten(dim, (Hk, E, r)).movedim(dim + 1, dim)


def _wide_weight(
    per_expert_EHkrDhD: torch.Tensor, others: list[torch.Tensor], layout: WideLayout
) -> torch.Tensor:
    """[X·Dh + Σ rows of others, D]: the per-expert weight (viewed [E, Hk, r, Dh, D], any strides)
    in wide head order, then `others` (2-D), written in one pass in the GEMM's dtype."""
    E, Hk, r, Dh, D = per_expert_EHkrDhD.shape
    rows = [E * Hk * r * Dh] + [t.shape[0] for t in others]
    wide_ND = per_expert_EHkrDhD.new_empty(sum(rows), D, dtype=autocast_dtype(per_expert_EHkrDhD))
    # narrow, not split: autograd allows in-place writes into single views only
    layout.per_expert_view(wide_ND.narrow(0, 0, rows[0]).view(-1, Dh, D), 0).copy_(per_expert_EHkrDhD)
    start = rows[0]
    for source in others:
        wide_ND.narrow(0, start, source.shape[0]).copy_(source)
        start += source.shape[0]
    return wide_ND


def _wide_out_weight(o_proj_EDN: torch.Tensor, layout: WideLayout) -> torch.Tensor:
    """[D, X·Dh]: every expert's output projection side by side, columns in wide head order,
    written in one pass in the GEMM's dtype. Built as F.linear's [out, in] weight, so that each
    head's Dh columns stay contiguous on both sides of the copy (a [X·Dh, D] build would be a
    transpose: reads strided by H·Dh, several times slower, and so would its gradient's)."""
    E, D, _ = o_proj_EDN.shape
    Hk, r, Dh = layout.num_kv_heads, layout.group_size, layout.head_dim
    wide_DN = o_proj_EDN.new_empty(D, E * Hk * r * Dh, dtype=autocast_dtype(o_proj_EDN))
    source_DEHkrDh = o_proj_EDN.view(E, D, Hk, r, Dh).transpose(0, 1)
    layout.per_expert_view(wide_DN.view(D, -1, Dh), 1).copy_(source_DEHkrDh)
    return wide_DN


def project_qkv(
    u_BSD: torch.Tensor,
    q_proj_END: torch.Tensor,
    k_proj: torch.Tensor,
    v_proj: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    layout: WideLayout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All experts' queries, keys and values from one GEMM: [B, S, X, Dh], [B, S, Y, Dh] twice.

    `q_proj_END` is [E, H·Dh, D]; `k_proj`/`v_proj` are [E, Hk·Dh, D] (expert-KV) or
    [Hk·Dh, D] (shared-KV); biases have the same shapes without the trailing D.
    """
    E, H, Dh = layout.num_experts, layout.num_heads, layout.head_dim
    D = u_BSD.shape[-1]
    X, Y = layout.wide_heads, layout.wide_kv_heads
    if not layout.share_kv and q_bias is None:
        # Expert-major heads are the parameters' own row order: three GEMMs on views of the
        # weights, no per-call concatenation (and no split of its gradient) at all.
        q_BSN, k_BSN, v_BSN = (F.linear(u_BSD, w.reshape(-1, D)) for w in (q_proj_END, k_proj, v_proj))
        return q_BSN.unflatten(-1, (X, Dh)), k_BSN.unflatten(-1, (Y, Dh)), v_BSN.unflatten(-1, (Y, Dh))
    Hk, r = layout.num_kv_heads, layout.group_size
    w_q_EHkrDhD = q_proj_END.view(E, Hk, r, Dh, D)
    w_qkv_ND = _wide_weight(w_q_EHkrDhD, [k_proj.reshape(-1, D), v_proj.reshape(-1, D)], layout)
    b_qkv_N = None
    if q_bias is not None:
        assert k_bias is not None and v_bias is not None
        b_q_XDh = layout.to_wide_heads(q_bias.view(E, H, Dh), 0)
        b_qkv_N = torch.cat([b_q_XDh.reshape(-1), k_bias.reshape(-1), v_bias.reshape(-1)])
    qkv_BSN = F.linear(u_BSD, w_qkv_ND, b_qkv_N)
    q_BSN, k_BSN, v_BSN = qkv_BSN.split([X * Dh, Y * Dh, Y * Dh], dim=-1)
    return q_BSN.unflatten(-1, (X, Dh)), k_BSN.unflatten(-1, (Y, Dh)), v_BSN.unflatten(-1, (Y, Dh))


def gate_and_project_out(
    heads_BXSDh: torch.Tensor,
    gate_BSE: torch.Tensor,
    o_proj_EDN: torch.Tensor,
    o_bias_ED: torch.Tensor | None,
    layout: WideLayout,
) -> torch.Tensor:
    """Σ_j g_j · (W_o^j · heads_j + b_o^j) as one GEMM over the gated wide heads: [B, S, D].

    `heads_BXSDh` is SDPA's output in wide head order; `o_proj_EDN` is [E, D, H·Dh].
    """
    B, X, S, Dh = heads_BXSDh.shape
    E, H = layout.num_experts, layout.num_heads
    gate_BSX = layout.to_wide_heads(gate_BSE[..., None].expand(B, S, E, H), 2)
    heads_BSXDh = heads_BXSDh.transpose(1, 2)
    if heads_BSXDh.is_contiguous():  # SDPA's kernels return [B, S, X, Dh] memory: one row per head
        gated_BSXDh = scale_rows(heads_BSXDh.view(-1, Dh), gate_BSX.reshape(-1)).view(B, S, X, Dh)
    else:
        gated_BSXDh = heads_BSXDh * gate_BSX[..., None]
    out_BSD = F.linear(gated_BSXDh.reshape(B, S, X * Dh), _wide_out_weight(o_proj_EDN, layout))
    if o_bias_ED is not None:
        out_BSD = out_BSD + gate_BSE @ o_bias_ED
    return out_BSD
