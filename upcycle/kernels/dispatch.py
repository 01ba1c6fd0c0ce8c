"""Routing bookkeeping on the device: assignments per expert and the expert-sorted permutation.

Shared by the grouped expert path (`upcycle.kernels.grouped_moe`), expert parallelism
(`upcycle.train.expert_parallel`), the routers' losses and load statistics (`upcycle.model`).
Neither reads anything back to the host, so both run inside a captured CUDA graph. Shape letters:
T tokens, K experts per token, A = T·K assignments, E experts.
"""

from __future__ import annotations

import torch

# Up to this many (assignment, expert) pairs, `expert_counts` compares every assignment with every
# expert and sums the columns; beyond it, a scatter-add into E counters. Compiled, the comparison
# and the sum are one fused reduction with no temporary; eager, the sum first copies the boolean
# [A, E] comparison to int64 (9 bytes a pair in all), hence the lower eager limit (9 MiB).
_ONE_HOT_COUNT_MAX = 1 << 26
_ONE_HOT_COUNT_MAX_EAGER = 1 << 20


def expert_counts(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (int64), without the host sync of CUDA's `bincount`. Indices
    must lie in [0, num_experts) (every router's do): neither version checks them on the device.

    A column sum of the one-hot comparison rather than a scatter-add where it is small: on a GPU
    the scatter's atomic adds into E counters serialise (a 16-call scatter kernel of 0.28 ms a
    step for 32k assignments over 8 experts on an H100, bench/RESULTS.md ninth round). Both are
    exact."""
    flat_A = indices_TK.reshape(-1)
    limit = _ONE_HOT_COUNT_MAX if torch.compiler.is_compiling() else _ONE_HOT_COUNT_MAX_EAGER
    if flat_A.numel() * num_experts <= limit:
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
