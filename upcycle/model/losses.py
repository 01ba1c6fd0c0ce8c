"""Router auxiliary losses of methods.md §1.2, each already multiplied by its coefficient.

| loss | formula | differentiable through |
|---|---|---|
| `switch_load_balancing` (Switch/GShard, Megatron) | α·N·Σ_i f_i·P_i | P only (f is a count) |
| `btx_load_balancing` (BTX, §3.3, §9.9) | α·N·Σ_i u_i·p_i | u and p |
| `router_z_loss` (ST-MoE; BAM) | β·mean_t (logsumexp_j l_tj)² | the logits |

- f_i: the fraction of the T·K routed assignments that go to expert i (Megatron normalises by
  T·k, §1.2), counted before any capacity drop: the loss balances what the router asks for.
- P_i = p_i: the mean over tokens of the *full* softmax probability of expert i.
- u_i: the mean over tokens of the gate value of expert i after the routing function, i.e. the
  combine weights scattered into a dense [T, E] matrix (zero for experts a token did not pick).
With uniform routing both load-balancing losses equal α. They are computed over all tokens of
the call (a micro-batch, padding included) and added once per MoE layer (§1.2).

Shape letters: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from upcycle.model.router import expert_counts


def switch_load_balancing(probs_TE: torch.Tensor, indices_TK: torch.Tensor, coef: float) -> torch.Tensor:
    """α·N·Σ_i f_i·P_i with f_i = (assignments to i)/(T·K), P_i = mean_t p_ti (methods.md §1.2)."""
    T, E = probs_TE.shape
    K = indices_TK.shape[-1]
    fraction_E = expert_counts(indices_TK, E).to(probs_TE.dtype) / (T * K)
    mean_prob_E = probs_TE.mean(dim=0)
    return coef * E * torch.sum(fraction_E * mean_prob_E)


def btx_load_balancing(
    probs_TE: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, coef: float
) -> torch.Tensor:
    """α·N·Σ_i u_i·p_i with u_i the mean gate value after routing (BTX, methods.md §1.2)."""
    E = probs_TE.shape[-1]
    gates_TE = torch.zeros_like(probs_TE).scatter(1, indices_TK, weights_TK.to(probs_TE.dtype))
    return coef * E * torch.sum(gates_TE.mean(dim=0) * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """β·mean_t (logsumexp_j l_tj)² (ST-MoE, methods.md §1.2)."""
    return coef * torch.logsumexp(logits_TE, dim=-1).square().mean()
