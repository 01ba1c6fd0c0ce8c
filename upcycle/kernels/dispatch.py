"""Routing bookkeeping on the device: assignments per expert and the expert-sorted permutation.

Shared by the grouped expert path (`upcycle.kernels.grouped_moe`), expert parallelism
(`upcycle.train.expert_parallel`), the routers' losses and load statistics (`upcycle.model`).
Neither reads anything back to the host, so both run inside a captured CUDA graph. Shape letters:
T tokens, K experts per token, A = T·K assignments, E experts.
"""

from __future__ import annotations

import torch

# Up to this many (assignment, expert) pairs, `expert_counts` compares every assignment with every
# expert and sums the columns; beyond it, a scatter-add into E counters.
_ONE_HOT_COUNT_MAX = 1 << 26


def expert_counts(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (int64), without the host sync of CUDA's `bincount`.

    A column sum of the one-hot comparison (one fused reduction when compiled) rather than a
    scatter-add: on a GPU the scatter's atomic adds into E counters serialise (about 17 µs for
    32k assignments over 8 experts on an H100, bench/RESULTS.md ninth round). Both are exact."""
    flat_A = indices_TK.reshape(-1)
    if flat_A.numel() * num_experts <= _ONE_HOT_COUNT_MAX:
        experts_E = torch.arange(num_experts, device=flat_A.device, dtype=flat_A.dtype)
        return (flat_A.unsqueeze(1) == experts_E).sum(0)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_A.device)
    return counts_E.scatter_add_(0, flat_A, torch.ones_like(flat_A))


def sort_by_expert(expert_A: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_A, inverse_A): the stable argsort of the expert indices `expert_A` (values in
    [0, num_experts)) and its inverse permutation, both int64.

    The keys are sorted in the narrowest integer type that holds them: a GPU radix sort makes one
    pass per byte of key, so uint8 keys (up to 256 experts) take one pass where int64 takes
    eight. The permutation is the same: a stable sort of equal values."""
    key = torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32767 else torch.int32
    order_A = torch.argsort(expert_A.to(key), stable=True)
    inverse_A = torch.empty_like(order_A).scatter_(
        0, order_A, torch.arange(order_A.numel(), device=order_A.device)
    )
    return order_A, inverse_A
