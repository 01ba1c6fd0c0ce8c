"""Routing bookkeeping (`upcycle.kernels.dispatch`) against torch's plain definitions."""

from __future__ import annotations

import pytest
import torch

from upcycle.kernels import dispatch


@pytest.mark.parametrize("num_experts", [1, 8, 64, 256, 257, 40000])
def test_sort_by_expert_is_the_stable_int64_argsort(num_experts: int) -> None:
    generator = torch.Generator().manual_seed(num_experts)
    expert_A = torch.randint(0, num_experts, (3000,), generator=generator)
    expert_A[:5] = num_experts - 1  # the largest index survives the narrow key
    order_A, inverse_A = dispatch.sort_by_expert(expert_A, num_experts)
    assert order_A.dtype == inverse_A.dtype == torch.int64
    assert torch.equal(order_A, torch.argsort(expert_A, stable=True))
    assert torch.equal(order_A[inverse_A], torch.arange(3000))
    assert torch.equal(inverse_A[order_A], torch.arange(3000))


@pytest.mark.parametrize("one_hot", [True, False])
def test_expert_counts_both_ways_equal_bincount(one_hot: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for limit in ("_ONE_HOT_COUNT_MAX", "_ONE_HOT_COUNT_MAX_EAGER"):
        monkeypatch.setattr(dispatch, limit, 1 << 40 if one_hot else 0)
    generator = torch.Generator().manual_seed(1)
    indices_TK = torch.randint(0, 7, (500, 3), generator=generator)  # expert 7 of 8 never chosen
    counts_E = dispatch.expert_counts(indices_TK, 8)
    assert counts_E.dtype == torch.int64
    assert torch.equal(counts_E, torch.bincount(indices_TK.reshape(-1), minlength=8))
    assert int(counts_E[7]) == 0


def test_expert_counts_eager_takes_the_scatter_above_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager, the one-hot sum's int64 copy of the [A, E] comparison is bounded by the eager limit."""
    calls = []
    scatter_add_ = torch.Tensor.scatter_add_
    monkeypatch.setattr(torch.Tensor, "scatter_add_", lambda *a: (calls.append(1), scatter_add_(*a))[1])
    small = torch.zeros(dispatch._ONE_HOT_COUNT_MAX_EAGER // 8, 1, dtype=torch.int64)
    assert torch.equal(dispatch.expert_counts(small, 8), torch.tensor([small.numel(), 0, 0, 0, 0, 0, 0, 0]))
    assert not calls
    large = torch.zeros(dispatch._ONE_HOT_COUNT_MAX_EAGER // 8 + 1, 1, dtype=torch.int64)
    assert int(dispatch.expert_counts(large, 8)[0]) == large.numel()
    assert calls == [1]
