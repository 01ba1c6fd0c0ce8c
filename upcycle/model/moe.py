"""The Mixture-of-Experts FFN layer: router, stacked routed experts, shared experts, capacity.

    y_t = Σ_{k} w_tk · Expert_{i_tk}(x_t)  [+ σ(w_s·x_t) ·] SharedFFN(x_t)

Routing and its weights come from `upcycle.model.router` (methods.md §1.1), the auxiliary
losses from `upcycle.model.losses` (§1.2), the capacity rule from §1.3.

Parameter layout (under the block's `mlp.`), chosen to match transformers 5's in-memory
Mixtral / Qwen-MoE modules so that adapters rename nothing inside a layer:

| name | shape | note |
|---|---|---|
| `gate.weight` | [E, D] | the router (HF calls it `gate`) |
| `experts.gate_up_proj` | [E, 2F, D] | gated experts: rows 0..F-1 are W_gate, rows F..2F-1 W_up |
| `experts.up_proj` | [E, F, D] | non-gated experts (`gated: false`) instead of gate_up_proj |
| `experts.down_proj` | [E, D, F] | |
| `shared_expert.{gate,up,down}_proj.weight` | as a dense MLP of width n_shared·F_shared | optional |
| `shared_expert_gate.weight` | [1, D] | optional sigmoid gate (Qwen2-MoE) |

Expert e computes down_e(act(gate_e x) ⊙ up_e x) (gated) or down_e(act(up_e x)).

Unusual choices and why:
- Two implementations of the experts give one function: `eager_experts` (a loop over experts,
  the reference) and `upcycle.kernels.grouped_moe` (sorted tokens, grouped GEMMs, no host sync);
  `implementation: auto` takes the grouped path where `torch._grouped_mm` runs natively.
- Capacity: a dropped assignment keeps its place but its combine weight becomes 0 in both
  implementations, so it contributes exactly 0 and the shapes stay static (no host sync). It
  does not save compute; the capacity factor is a modelling choice here (methods.md §6, Llama 3
  Meets MoE's regularising drop), not a speed one.
- Combine weights are computed in fp32 and cast to the activation dtype before they multiply
  the expert outputs, as transformers does.
- Aux losses are returned already multiplied by their coefficients, under the keys
  `moe_load_balancing` and `moe_z_loss` (zero coefficients: key absent). The MoA router uses
  `moa_z_loss`, so the two never collide in a BAM block. Per-expert assignment counts of the
  last call are kept, detached, in `expert_load` for logging.
- sample_top1 routes the first MoE layer softly (BTX's ablation, methods.md §1.1) unless
  `sample_top1_soft_first_layer` is off.

Shape letters: B batch, S sequence, T tokens, D model width, F expert width, E experts,
K experts per token, C tokens routed to one expert, P width of the first projection (2F or F).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.kernels.dtypes import autocast_dtype
from upcycle.kernels.grouped_moe import grouped_mm_available, grouped_moe
from upcycle.model.config import ModelConfig
from upcycle.model.losses import btx_load_balancing, router_z_loss, switch_load_balancing
from upcycle.model.mlp import GatedMLP, activation_fn
from upcycle.model.router import Router, Routing, capacity_keep_mask, expert_capacity, expert_counts

AuxLosses = dict[str, torch.Tensor]


def eager_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    w_in_EPD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
) -> torch.Tensor:
    """The reference: for each expert, gather its tokens, run it, add the weighted output back."""
    out_TD = torch.zeros_like(x_TD)
    for expert, (w_in_PD, w_down_DF) in enumerate(zip(w_in_EPD.unbind(0), w_down_EDF.unbind(0), strict=True)):
        token_C, slot_C = torch.where(indices_TK == expert)
        h_CP = F.linear(x_TD.index_select(0, token_C), w_in_PD)
        if gated:
            gate_CF, up_CF = h_CP.chunk(2, dim=-1)
            h_CF = activation(gate_CF) * up_CF
        else:
            h_CF = activation(h_CP)
        y_CD = F.linear(h_CF, w_down_DF) * weights_TK[token_C, slot_C].unsqueeze(-1)
        out_TD.index_add_(0, token_C, y_CD)
    return out_TD


class Experts(nn.Module):
    """E routed experts stacked in 3-D tensors (layout in the module docstring).

    `dispatch`: None runs the experts here; expert parallelism (`upcycle.train.expert_parallel`)
    sets it on a sharded model to a callable `(experts, x_TD, weights_TK, indices_TK,
    implementation) -> out_TD` that sends each assignment to the rank holding its expert.
    """

    dispatch: Callable[..., torch.Tensor] | None = None

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str, gated: bool
    ) -> None:
        super().__init__()
        E, D, F_ = num_experts, hidden_size, intermediate_size
        self.gated = gated
        self.act = activation_fn(activation)
        if gated:
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        else:
            self.up_proj = nn.Parameter(torch.empty(E, F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))
        self.reset_parameters()

    @property
    def w_in_EPD(self) -> torch.Tensor:
        return self.gate_up_proj if self.gated else self.up_proj

    def reset_parameters(self) -> None:
        """U(±1/√fan_in), the default of the dense `nn.Linear` each expert slice replaces."""
        for weight in (self.w_in_EPD, self.down_proj):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)

    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, implementation: str
    ) -> torch.Tensor:
        if self.dispatch is not None:
            return self.dispatch(self, x_TD, weights_TK, indices_TK, implementation)
        run = grouped_moe if implementation == "grouped" else eager_experts
        # Under autocast the experts compute in the autocast dtype: _grouped_mm is not on
        # autocast's cast lists, so the (fp32 master) weights are cast here, as F.linear would be.
        w_in_EPD, w_down_EDF = self.w_in_EPD.to(x_TD.dtype), self.down_proj.to(x_TD.dtype)
        return run(x_TD, weights_TK, indices_TK, w_in_EPD, w_down_EDF, self.act, self.gated)


class PlainMLP(nn.Module):
    """down(act(up(x))): the shared expert of a non-gated MoE (`gated: false`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = activation_fn(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x_TD)))


class MoE(nn.Module):
    """One MoE FFN layer; forward(x_BSD) -> (out_BSD, aux losses)."""

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__()
        moe = config.moe
        if moe is None:
            raise ValueError("MoE needs a config with a moe section")
        D, E = config.hidden_size, moe.num_experts
        routing = config.moe_layer_routing(layer_index)
        self.num_experts = E
        self.top_k = config.moe_experts_per_token(layer_index)
        self.capacity_factor = moe.capacity_factor
        self.aux_loss, self.aux_loss_coef, self.z_loss_coef = moe.aux_loss, moe.aux_loss_coef, moe.z_loss_coef
        self.implementation = moe.implementation
        self.gate = Router(D, E, routing, self.top_k, moe.renormalize, moe.sample_top1_decay)
        self.experts = Experts(E, D, int(config.moe_intermediate_size), config.hidden_act, moe.gated)
        shared_width = config.shared_expert_intermediate_size
        self.shared_expert: nn.Module | None = None
        if shared_width:
            mlp_class = GatedMLP if moe.gated else PlainMLP
            self.shared_expert = mlp_class(D, shared_width, config.hidden_act)
        self.shared_expert_gate = nn.Linear(D, 1, bias=False) if moe.shared_expert_gate else None
        self.expert_load: torch.Tensor | None = None

    def resolved_implementation(self, x_TD: torch.Tensor) -> str:
        """`eager` or `grouped`; `auto` is grouped where `torch._grouped_mm` runs natively."""
        if self.implementation != "auto":
            return self.implementation
        widths = tuple(self.experts.down_proj.shape[1:])  # (D, F), static even when x is dynamic
        return "grouped" if grouped_mm_available(x_TD.device, x_TD.dtype, widths) else "eager"

    def routed_weights(self, routing: Routing) -> torch.Tensor:
        """Combine weights after capacity: dropped assignments get weight 0 (methods.md §1.3)."""
        if self.capacity_factor is None:
            return routing.weights_TK
        T = routing.indices_TK.shape[0]
        capacity = expert_capacity(T, self.top_k, self.capacity_factor, self.num_experts)
        keep_TK = capacity_keep_mask(routing.probs_TE, routing.indices_TK, capacity)
        return routing.weights_TK.masked_fill(~keep_TK, 0.0)

    def aux_losses(self, routing: Routing) -> AuxLosses:
        aux: AuxLosses = {}
        if self.aux_loss_coef > 0 and self.aux_loss == "switch":
            aux["moe_load_balancing"] = switch_load_balancing(
                routing.probs_TE, routing.indices_TK, self.aux_loss_coef
            )
        elif self.aux_loss_coef > 0 and self.aux_loss == "btx":
            aux["moe_load_balancing"] = btx_load_balancing(
                routing.probs_TE, routing.weights_TK, routing.indices_TK, self.aux_loss_coef
            )
        if self.z_loss_coef > 0:
            aux["moe_z_loss"] = router_z_loss(routing.logits_TE, self.z_loss_coef)
        return aux

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, AuxLosses]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.gate(x_TD)
        expert_x_TD = x_TD.to(autocast_dtype(x_TD))
        weights_TK = self.routed_weights(routing).to(expert_x_TD.dtype)
        implementation = self.resolved_implementation(expert_x_TD)
        out_TD = self.experts(expert_x_TD, weights_TK, routing.indices_TK, implementation)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        self.expert_load = expert_counts(routing.indices_TK, self.num_experts).detach()
        return out_TD.view(x_BSD.shape), self.aux_losses(routing)
