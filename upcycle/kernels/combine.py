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

from upcycle.kernels.swiglu import kernels, launch_device, use_triton

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


def gather_sum_triton(src_AD: torch.Tensor, index_A: torch.Tensor, weights_TK: torch.Tensor | None, K: int):
    src_AD = src_AD if src_AD.stride(-1) == 1 else src_AD.contiguous()
    D = src_AD.shape[1]
    T = index_A.shape[0] // K
    out_TD = torch.empty(T, D, dtype=src_AD.dtype, device=src_AD.device)
    if T and D:
        tk = kernels()
        block = min(_BLOCK_D, tk.triton.next_power_of_2(D))
        weights = weights_TK.contiguous() if weights_TK is not None else index_A  # unused when absent
        with launch_device(src_AD):
            tk.gather_sum_kernel[(T, tk.triton.cdiv(D, block))](
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


# ----------------------------------------------------------------------------- row scaling
#
# BAM's soft gate multiplies every head row of expert j at token t by g_j(t):
#     y[r] = s[r] · x[r],   dx[r] = s[r] · dy[r],   ds[r] = <dy[r], x[r]>
# Autograd's backward of the broadcast multiply writes the [rows, Dh] product dy ⊙ x and then
# reduces it; the kernel below reads dy and x once and writes dx and ds directly.


class _ScaleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RW: torch.Tensor, s_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_RW, s_R)
        return x_RW * s_R[:, None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_RW: torch.Tensor):
        x_RW, s_R = ctx.saved_tensors
        dy_RW = dy_RW if dy_RW.stride(-1) == 1 else dy_RW.contiguous()
        R, W = x_RW.shape
        dx_RW = torch.empty_like(dy_RW, memory_format=torch.contiguous_format)
        ds_R = torch.empty(R, dtype=torch.float32, device=x_RW.device)
        if R:
            rows = 16
            tk = kernels()
            with launch_device(x_RW):
                tk.scale_rows_backward_kernel[(tk.triton.cdiv(R, rows),)](
                    dy_RW, x_RW, s_R, dx_RW, ds_R, R, W, dy_RW.stride(0), x_RW.stride(0), dx_RW.stride(0),
                    ROWS=rows, BLOCK=tk.triton.next_power_of_2(W),
                )  # fmt: skip
        return dx_RW, ds_R.to(s_R.dtype)


def scale_rows(x_RW: torch.Tensor, s_R: torch.Tensor) -> torch.Tensor:
    """x_RW · s_R[:, None]: each row times its scalar, with a one-pass backward on CUDA (eager).

    Rows must be at most 1024 wide (attention heads); anything else takes the plain multiply.
    """
    if use_triton(x_RW) and x_RW.shape[1] <= 1024 and x_RW.stride(-1) == 1 and s_R.is_contiguous():
        return _ScaleRows.apply(x_RW, s_R)
    return x_RW * s_R[:, None]
