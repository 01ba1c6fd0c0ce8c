"""Grouped GEMMs that read their token rows by index: the row gathers of the expert path fused
into the GEMMs' operand loads (Triton; opt-in, `grouped_moe.GATHER_GEMM`).

The grouped expert path (`upcycle.kernels.grouped_moe`) gathers token rows up to three times per
layer: x_AD = x[token_A] before the first GEMM, g_AD = dL/dout[token_A] and x_AD again in the
backward pass (twice when the forward's x_AD is kept, `KEEP_DISPATCHED_ROWS`). Each is an [A, D] write and read, A = K·T: at 64 experts top-8 they were 1.04 ms of
S2's 10.21 ms on an H100 (bench/RESULTS.md, "Where S2's time goes"), and `torch._grouped_mm`
cannot take row indices. The two kernels here can:

- `gather_grouped_mm(src, rows, w, offsets, w_layout)`: out[a] = src[rows[a]] · W[e(a)] for the
  expert-sorted rows a, with W[e] stored [N, K] (`"nk"`, multiplied transposed: the first
  projection) or [K, N] (`"kn"`: the down projection's input gradient). Row tiles never straddle
  two experts: each expert's rows are cut into tiles of BM and every program finds its expert from
  the offsets on the device (no host synchronisation, no padded index arrays).
- `gather_grouped_wgrad(g, g_rows, s, s_rows, offsets)`: dW[e] = Σ over expert e's rows of
  g[g_rows[a]]^T s[s_rows[a]], either operand gathered (None: taken in sorted order): the
  weight gradients, with g = dL/dout gathered for the down projection and s = x gathered for the
  first one. Experts without rows get zeros.

Accumulation in fp32, one rounding on store; fp32 inputs multiply in IEEE fp32, bf16 in bf16
tensor cores. Offsets into the stacked weights are int64 (E experts can exceed 2^31 elements).
Rows of the output past `offsets[-1]` are not written (the expert path's offsets always end at
A). Triton's CPU interpreter checks the indexing in fp32 only (its bf16 products are wrong); bf16
and the IEEE claim are checked on the GPU (tests/test_gather_gemm.py, gpu marker). Whether these beat a separate gather plus CUTLASS's grouped GEMM depends on
the GPU and the shape, which is why they are off by default: `bench/moe_layer.py` times both
(row "ours grouped, fused gathers"). tests/test_gather_gemm.py checks both kernels against
torch in Triton's CPU interpreter (empty experts, sizes that are not tile multiples) and the whole
expert path with them against the eager loop.

Shape letters: A expert-sorted rows, R source rows, E experts, N output width, K reduced width.
"""

from __future__ import annotations

import torch

from upcycle.kernels.swiglu import kernels, launch_device

# Tile sizes (untuned; the bench sweeps them): rows × columns × reduction.
MM_TILES = (128, 128, 64)
WGRAD_TILES = (128, 128, 64)  # N × K × rows
NUM_WARPS, NUM_STAGES = 8, 3


def set_tiles(spec: str) -> None:
    """Set both kernels' launch configuration from "BM,BN,BK,warps,stages" (a bench's tile sweep).

    The wgrad kernel reads the three sizes as N × K × rows. Sizes must be powers of two of at
    least 16 (Triton's dot), warps a power of two, stages at least 1.
    """
    try:
        a, b, c, warps, stages = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"tiles must be five integers BM,BN,BK,warps,stages, got {spec!r}") from None
    if any(v < 16 or v & (v - 1) for v in (a, b, c)) or warps < 1 or warps & (warps - 1) or stages < 1:
        raise ValueError(
            f"tiles {spec!r}: sizes must be powers of two >= 16, warps a power of two, stages >= 1"
        )
    global MM_TILES, WGRAD_TILES, NUM_WARPS, NUM_STAGES
    MM_TILES = WGRAD_TILES = (a, b, c)
    NUM_WARPS, NUM_STAGES = warps, stages


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _launch_options(t: torch.Tensor) -> dict:
    """num_warps / num_stages for the GPU; the interpreter (CPU tensors) takes none."""
    return {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES} if t.is_cuda else {}


def _check(offsets_E: torch.Tensor, num_experts: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """Refuse what the kernels would read out of bounds or fail to compile on."""
    if offsets_E.dtype != torch.int32 or tuple(offsets_E.shape) != (num_experts,):
        raise ValueError(
            f"offsets must be int32 of shape ({num_experts},), got {offsets_E.dtype} {tuple(offsets_E.shape)}"
        )
    if a.dtype != b.dtype:
        raise ValueError(f"both operands must have one dtype, got {a.dtype} and {b.dtype}")


def gather_grouped_mm(
    src_RK: torch.Tensor,
    rows_A: torch.Tensor | None,
    w: torch.Tensor,
    offsets_E: torch.Tensor,
    w_layout: str,
) -> torch.Tensor:
    """out_AN[a] = src_RK[rows_A[a]] · W[e(a)] (rows_A None: src_RK[a]).

    `w` is [E, N, K] for `w_layout="nk"` (the product uses W[e]^T) or [E, K, N] for `"kn"`;
    `offsets_E` are the int32 cumulative row counts of the sorted rows.
    """
    if w_layout not in ("nk", "kn"):
        raise ValueError(f"w_layout must be 'nk' or 'kn', got {w_layout!r}")
    E = w.shape[0]
    if w_layout == "nk":
        N, K = w.shape[1], w.shape[2]
        stride_wn, stride_wk = w.stride(1), w.stride(2)
    else:
        K, N = w.shape[1], w.shape[2]
        stride_wk, stride_wn = w.stride(1), w.stride(2)
    if src_RK.shape[1] != K:
        raise ValueError(f"source rows have width {src_RK.shape[1]}, the weights reduce over {K}")
    _check(offsets_E, E, src_RK, w)
    src_RK = src_RK if src_RK.stride(-1) == 1 else src_RK.contiguous()
    A = rows_A.shape[0] if rows_A is not None else src_RK.shape[0]
    out_AN = torch.empty(A, N, dtype=src_RK.dtype, device=src_RK.device)
    if A and N:
        tk = kernels()
        BM, BN, BK = MM_TILES
        grid = (tk.triton.cdiv(A, BM) + E, tk.triton.cdiv(N, BN))
        rows = rows_A.contiguous() if rows_A is not None else offsets_E  # unused without GATHER
        with launch_device(src_RK):
            tk.gather_grouped_mm_kernel[grid](
                src_RK, rows, w, out_AN, offsets_E.contiguous(), N, K,
                src_RK.stride(0), w.stride(0), stride_wk, stride_wn, out_AN.stride(0),
                E=E, E_POW2=tk.triton.next_power_of_2(E), GATHER=rows_A is not None,
                PRECISION=_precision(src_RK), BM=BM, BN=BN, BK=BK, **_launch_options(src_RK),
            )  # fmt: skip
    return out_AN


def gather_grouped_wgrad(
    g_RN: torch.Tensor,
    g_rows_A: torch.Tensor | None,
    s_RK: torch.Tensor,
    s_rows_A: torch.Tensor | None,
    offsets_E: torch.Tensor,
) -> torch.Tensor:
    """dW_ENK[e] = Σ over expert e's sorted rows a of g_RN[g_rows_A[a]]^T s_RK[s_rows_A[a]]."""
    _check(offsets_E, offsets_E.shape[0], g_RN, s_RK)
    g_RN = g_RN if g_RN.stride(-1) == 1 else g_RN.contiguous()
    s_RK = s_RK if s_RK.stride(-1) == 1 else s_RK.contiguous()
    E, N, K = offsets_E.shape[0], g_RN.shape[1], s_RK.shape[1]
    out_ENK = torch.empty(E, N, K, dtype=s_RK.dtype, device=s_RK.device)
    if E and N and K:
        tk = kernels()
        BN, BK, BR = WGRAD_TILES
        g_rows = g_rows_A.contiguous() if g_rows_A is not None else offsets_E
        s_rows = s_rows_A.contiguous() if s_rows_A is not None else offsets_E
        with launch_device(s_RK):
            tk.gather_grouped_wgrad_kernel[(E, tk.triton.cdiv(N, BN), tk.triton.cdiv(K, BK))](
                g_RN, g_rows, s_RK, s_rows, out_ENK, offsets_E.contiguous(), N, K,
                g_RN.stride(0), s_RK.stride(0), out_ENK.stride(0), out_ENK.stride(1),
                G_GATHER=g_rows_A is not None, S_GATHER=s_rows_A is not None,
                PRECISION=_precision(s_RK), BN=BN, BK=BK, BR=BR, **_launch_options(s_RK),
            )  # fmt: skip
    return out_ENK
