"""Gather-and-sum over each token's K expert rows: the combine step of the grouped expert path.

    out[t] = Σ_k w[t, k] · src[index[t·K + k]]      (w optional: the backward's dx un-permute)

`src` holds one row per assignment in expert order and `index` (the inverse permutation) says
where token t's k-th row sits. The plain torch version un-permutes into an [A, D] temporary and
reduces it (`index_select`, then a multiply-sum or a batched [1, K] × [K, D] product); the Triton
kernel reads each row once and writes the [T, D] result directly, accumulating in fp32 in the
order k = 0 … K−1 (deterministic, no atomics). At 64 experts top-8 the temporary is K = 8 times
the layer input.

Triton on CUDA in eager mode; torch elsewhere (CPU, fp64, and under `torch.compile`, where
inductor fuses the gather into the reduction itself). tests/test_swiglu.py checks both against
the reference (the kernel through Triton's CPU interpreter, and on the GPU machine).

Shape letters: T tokens, K rows per token, A = T·K rows, D row width.
"""

from __future__ import annotations

import torch

from upcycle.kernels.swiglu import tl, triton, use_triton

_BLOCK_D = 1024
# The torch version's switch: a batched [1, K] × [K, D] product skips the [A, D] temporary of
# multiply-and-sum; on an H100 (bf16) it was 4% faster at K = 8 but 5–30% slower at K = 2 and 4.
_BMM_COMBINE_MIN_K = 8


def gather_sum_torch(src_AD: torch.Tensor, index_A: torch.Tensor, weights_TK: torch.Tensor | None, K: int):
    T = index_A.shape[0] // K
    src_TKD = src_AD.index_select(0, index_A).view(T, K, src_AD.shape[1])
    if weights_TK is None:
        return src_TKD.sum(dim=1)
    if K >= _BMM_COMBINE_MIN_K:
        return torch.bmm(weights_TK.unsqueeze(1), src_TKD).squeeze(1)
    return (src_TKD * weights_TK.unsqueeze(-1)).sum(dim=1)


if triton is not None:

    @triton.jit
    def _gather_sum_kernel(
        src_ptr, index_ptr, w_ptr, out_ptr, D, stride_src, stride_out,
        K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(index_ptr + token * K + k).to(tl.int64)
            value = tl.load(src_ptr + row * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                value = value * tl.load(w_ptr + token * K + k).to(tl.float32)
            acc += value
        tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum_triton(src_AD: torch.Tensor, index_A: torch.Tensor, weights_TK: torch.Tensor | None, K: int):
    src_AD = src_AD if src_AD.stride(-1) == 1 else src_AD.contiguous()
    D = src_AD.shape[1]
    T = index_A.shape[0] // K
    out_TD = torch.empty(T, D, dtype=src_AD.dtype, device=src_AD.device)
    if T and D:
        block = min(_BLOCK_D, triton.next_power_of_2(D))
        weights = weights_TK.contiguous() if weights_TK is not None else index_A  # unused when absent
        _gather_sum_kernel[(T, triton.cdiv(D, block))](
            src_AD, index_A.contiguous(), weights, out_TD, D, src_AD.stride(0), out_TD.stride(0),
            K=K, HAS_WEIGHTS=weights_TK is not None, BLOCK=block,
        )  # fmt: skip
    return out_TD


def gather_sum(
    src_AD: torch.Tensor, index_A: torch.Tensor, weights_TK: torch.Tensor | None, K: int
) -> torch.Tensor:
    """out_TD[t] = Σ_k weights[t, k] · src_AD[index_A[t·K + k]] (weights None: a plain sum)."""
    if use_triton(src_AD):
        return gather_sum_triton(src_AD, index_A, weights_TK, K)
    return gather_sum_torch(src_AD, index_A, weights_TK, K)
