"""Router logits in fp32 from a bf16 input on a GPU (the fp32 router of methods.md §1.1).

The router computes l = x W^T in fp32 whatever the model dtype (`upcycle.model.router`). With a
bf16 input x that means an upcast copy of x, an fp32 GEMM on CUDA cores, and in backward an fp32
dL/dx of the full [T, D] size cast back to bf16: on the fine-grained S2 layer about 3% of the
step (bench/RESULTS.md, "Where S2's time goes"), for a GEMM with only E output columns. Two ways
around it, both custom operators:

Routers of up to `FP32_KERNEL_MAX_EXPERTS` (16) experts: three Triton kernels
(`triton_kernels.router_*`) that read x in bf16 and W as it is stored, and multiply and add in
IEEE fp32 on the CUDA cores (no TF32): logits (one launch), dL/dx (one launch, one rounding to
bf16) and dL/dW (partial sums over chunks of `_CHUNK` tokens, then one sum over the chunks:
deterministic, no atomics). Their accuracy is an fp32 SGEMM's (within D·2^-24 of Σ|x||w| element
by element), and their work is mostly memory traffic (reading or writing x once each): each
program loads a wide tile of x and reuses it for every expert. On an H100 at the Mixtral-shaped
step's router (16384 tokens, D 1024, 8 experts) a forward and backward takes 0.118 ms, as the
bf16-part GEMMs below do (0.116 ms, with about 40 more launches a layer for their splits,
concatenations and sums), with a third to a tenth of the parts' error (below; bench/RESULTS.md, twelfth round; the
first version, tl.dot's fp32 path, took half as long again: eleventh round).

Wider routers (or without Triton), the bf16 parts:

Every fp32 number is the exact sum of three bf16 numbers (each rounding to bf16 keeps 8 of the
24 significand bits and leaves an fp32-exact remainder; the exponent ranges are the same), and
the product of two bf16 numbers is exact in fp32. So, with x already bf16 (exact):

- forward: l = x W_0^T + x W_1^T + x W_2^T with W = W_0 + W_1 + W_2: one bf16 GEMM against the
  three parts stacked ([3E, D]), fp32 accumulation and output, then the three [T, E] slices summed
  (smallest first). Every product is exact; what differs from an fp32 GEMM is the additions.
- dL/dW = g^T x with g = g_0 + g_1 + g_2 (the fp32 logit gradient split the same way): one GEMM,
  exact products, fp32 accumulation; returned in W's dtype.
- dL/dx = g W, wanted in bf16 (x's dtype): the six terms g_i W_j with i + j ≤ 2 carry it to
  2^-24 of Σ|g||W| (the dropped terms are smaller), far below the one rounding to bf16 at the
  end, also where the rows of W share a component that cancels in g W (a softmax gradient sums
  to zero over the experts); one GEMM with K = 6E and bf16 output (fp32 accumulation inside).

Accuracy, measured: the additions run in the tensor cores' accumulator, which on Hopper is not
IEEE fp32. On an H100 the logits of a D = 2048 router came within 2.1e-6 of fp64 (relative
norm), where an fp32 SGEMM comes within 2-6e-7 and bf16 logits (transformers' routers under
autocast) within about 4e-3 (bench/RESULTS.md, fifth round). Routing decisions can differ from
an fp32 GEMM's only between experts whose logits agree to about 1e-6, as they can between two
fp32 GEMM algorithms at 1e-7. On the CPU (the emulation below) the additions are IEEE fp32.

A bf16 weight (a bf16 checkpoint) is its own single part (the fp32 kernels read it as it is).
Other dtypes (fp32 or fp64 inputs: the exactness tests of methods.md §7), the CPU and GPUs
without bf16 tensor cores keep the plain upcast GEMM (`applies`). A backward pass that is differentiated again (create_graph) computes
its products the plain way, so double backward works as before; torch.func transforms of the
operator are not supported.

Forward and backward are custom operators (`upcycle::router_logits`, which also returns the
weight's stacked bf16 parts for backward, none on the fp32 kernels, and
`upcycle::router_logits_backward`), so that compiled graphs run these same kernels (a bf16 GEMM
with an fp32 output is not an operator every inductor version lowers). tests/test_router_gemm.py
checks the parts against fp64 products on the CPU, where the bf16 GEMMs are emulated by fp32
GEMMs of the upcast operands (products of bf16 numbers are exact there too), the fp32 kernels
through Triton's CPU interpreter, both with `torch.library.opcheck`, and on the GPU at the bounds
above; tests/test_triton_sm90.py compiles the kernels for an H100 (no TF32, no spills).
"""

from __future__ import annotations

import torch

from upcycle.kernels.swiglu import (
    kernels,
    launch_device,
    triton_installed,
    triton_interpreted,
    unit_stride_rows,
)
from upcycle.kernels.trace import trace_constant

_BF16 = torch.bfloat16

# Routers of up to this many experts run as the fp32 Triton kernels (`fp32_kernels`); wider ones
# take the bf16-part GEMMs. The kernels multiply on the CUDA cores, T·E·D multiply-adds each (E
# padded to a power of two); at 64 experts (S2) that is four times the work at 16, where the
# tensor cores' GEMMs are the cheaper way. 0 sends every router to the bf16 parts.
FP32_KERNEL_MAX_EXPERTS = 16
# Launch shapes, the fastest on an H100 at both router shapes of bench/router_kernels.py
# (bench/RESULTS.md, twelfth round). A logits program reuses a tile of x of _LOGITS_TILE elements,
# _LOGITS_BLOCK_D features wide, for every expert; a dW program does the same over tiles of
# _DW_TILE elements, _DW_BLOCK_D features wide, summing chunks of _CHUNK tokens; dL/dx programs
# write [_DX_BLOCK_T, _DX_BLOCK_D] tiles. _*_WARPS: warps a program.
_LOGITS_TILE, _LOGITS_BLOCK_D, _LOGITS_WARPS = 8192, 256, 4
_DW_TILE, _DW_BLOCK_D, _CHUNK, _DW_WARPS = 8192, 64, 256, 4
_DX_BLOCK_T, _DX_BLOCK_D, _DX_WARPS = 16, 512, 4


def applies(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> bool:
    """Whether `router_logits` computes the fp32 logits here: a bf16 input on an NVIDIA GPU with
    bf16 tensor cores (compute capability 8 or above; cuBLAS refuses bf16 GEMMs with an fp32
    output below it) and an fp32 or bf16 weight. Elsewhere the upcast fp32 GEMM is as fast or
    the only choice."""
    return (
        x_TD.is_cuda
        and x_TD.dtype == _BF16
        and weight_ED.dtype in (torch.float32, _BF16)
        and _bf16_tensor_cores(x_TD.device.index)
    )


@trace_constant  # a constant of the trace: no graph break, no guard
def _bf16_tensor_cores(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 8


_BF16_MAX = torch.finfo(_BF16).max


def split_bf16(t: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """bf16 tensors whose fp32 sum is `t` (fp32 or bf16): exactly for 3 parts, barring values
    within 2^16 of fp32's smallest normal number, whose last parts underflow (an error below
    2^-133). A finite value above bf16's largest is split around that largest, so no part
    overflows; an inf or NaN is its own first part, the others zero. Eleven element-wise ops
    for three parts (the router runs them every step: few launches matter)."""
    t = t.float()
    piece = torch.where(torch.isfinite(t), t.clamp(-_BF16_MAX, _BF16_MAX), t).to(_BF16)
    pieces = [piece]
    if parts > 1:
        # exact: the rounding error of an fp32 → bf16 rounding (or the clamped excess), finite;
        # inf - inf and NaN give NaN, which becomes 0
        rest = (t - piece.float()).nan_to_num_(0.0, 0.0, 0.0)
        for i in range(1, parts):
            piece = rest.to(_BF16)
            pieces.append(piece)
            if i + 1 < parts:
                rest = rest - piece.float()
    return pieces


def _weight_parts(weight_ED: torch.Tensor) -> int:
    return 1 if weight_ED.dtype == _BF16 else 3


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 a and b, fp32 accumulation and fp32 result. On the CPU the same numbers
    come from an fp32 GEMM of the upcast operands (their products are exact in fp32)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _mm_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 a and b, fp32 accumulation, one rounding to bf16 at the end."""
    if a.is_cuda:
        return torch.mm(a, b)
    return (a.float() @ b.float()).to(_BF16)


def _sum_parts(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The sum of the parts' products, smallest parts first."""
    total = parts[-1]
    for part in reversed(parts[:-1]):
        total = total + part
    return total.contiguous()


def fp32_kernels(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> bool:
    """Whether `router_logits` runs as the fp32 Triton kernels (module docstring): Triton, a
    CUDA tensor (or its CPU interpreter, for the tests) and at most `FP32_KERNEL_MAX_EXPERTS`."""
    return (
        triton_installed()
        and (x_TD.is_cuda or triton_interpreted())
        and weight_ED.shape[0] <= FP32_KERNEL_MAX_EXPERTS
    )


def _block_e(E: int) -> int:
    return max(2, 1 << (E - 1).bit_length())


def _pow2_at_most(n: int, limit: int) -> int:
    """The smallest power of two ≥ n, at most `limit` (a power of two)."""
    return min(limit, 1 << max(0, n - 1).bit_length())


def logits_blocks(D: int) -> tuple[int, int]:
    """(tokens, features) of a logits program's tile of x."""
    block_d = _pow2_at_most(D, _LOGITS_BLOCK_D)
    return max(1, _LOGITS_TILE // block_d), block_d


def dw_blocks(D: int) -> tuple[int, int]:
    """(tokens, features) of a dW program's tile of x: the tokens a power of two that divides
    `_CHUNK` (a chunk's last tile must not reach into the next chunk, which sums it too)."""
    block_d = _pow2_at_most(D, _DW_BLOCK_D)
    block_t = 1 << (max(1, min(_CHUNK, _DW_TILE // block_d)).bit_length() - 1)
    while _CHUNK % block_t:
        block_t //= 2
    return block_t, block_d


def _logits_fp32(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    x_TD, weight_ED = unit_stride_rows(x_TD), weight_ED.contiguous()
    (T, D), E = x_TD.shape, weight_ED.shape[0]
    logits_TE = torch.empty(T, E, dtype=torch.float32, device=x_TD.device)
    if T and E:
        tk = kernels()
        block_t, block_d = logits_blocks(D)
        with launch_device(x_TD):
            tk.router_logits_kernel[(tk.triton.cdiv(T, block_t),)](
                x_TD, weight_ED, logits_TE, T, D, E, x_TD.stride(0),
                BLOCK_T=block_t, BLOCK_E=_block_e(E), BLOCK_D=block_d, num_warps=_LOGITS_WARPS,
            )  # fmt: skip
    return logits_TE


def _dx_fp32(grad_TE: torch.Tensor, weight_ED: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    grad_TE, weight_ED = grad_TE.float().contiguous(), weight_ED.contiguous()
    (T, E), D = grad_TE.shape, weight_ED.shape[1]
    dx_TD = torch.empty(T, D, dtype=dtype, device=grad_TE.device)
    if T and D:
        tk = kernels()
        with launch_device(grad_TE):
            tk.router_dx_kernel[(tk.triton.cdiv(T, _DX_BLOCK_T), tk.triton.cdiv(D, _DX_BLOCK_D))](
                grad_TE, weight_ED, dx_TD, T, D, E, dx_TD.stride(0),
                BLOCK_T=_DX_BLOCK_T, BLOCK_E=_block_e(E), BLOCK_D=_DX_BLOCK_D, num_warps=_DX_WARPS,
            )  # fmt: skip
    return dx_TD


def _dw_fp32(grad_TE: torch.Tensor, x_TD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    grad_TE, x_TD = grad_TE.float().contiguous(), unit_stride_rows(x_TD)
    (T, E), D = grad_TE.shape, x_TD.shape[1]
    if not (T and D and E):
        return torch.zeros(E, D, dtype=dtype, device=x_TD.device)
    chunks = -(-T // _CHUNK)
    parts_CED = torch.empty(chunks, E, D, dtype=torch.float32, device=x_TD.device)  # all written
    tk = kernels()
    block_t, block_d = dw_blocks(D)
    with launch_device(x_TD):
        tk.router_dw_kernel[(tk.triton.cdiv(D, block_d), chunks)](
            grad_TE, x_TD, parts_CED, T, D, E, x_TD.stride(0),
            CHUNK=_CHUNK, BLOCK_T=block_t, BLOCK_E=_block_e(E), BLOCK_D=block_d, num_warps=_DW_WARPS,
        )  # fmt: skip
    return (parts_CED[0] if chunks == 1 else parts_CED.sum(0)).to(dtype)


@torch.library.custom_op("upcycle::router_logits", mutates_args=())
def router_logits_op(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits x W^T, the weight's bf16 parts stacked [parts·E, D]) of a 2-D bf16 `x_TD` and
    an fp32 or bf16 `weight_ED`; the parts are returned so that backward does not split again
    (none, [0, D], on the fp32 kernels)."""
    if fp32_kernels(x_TD, weight_ED):
        return _logits_fp32(x_TD, weight_ED), x_TD.new_empty((0, weight_ED.shape[1]), dtype=_BF16)
    parts, E = _weight_parts(weight_ED), weight_ED.shape[0]
    stacked_PD = torch.cat(split_bf16(weight_ED, parts))
    logits_TE = _sum_parts(_mm_fp32(x_TD, stacked_PD.t()).view(x_TD.shape[0], parts, E).unbind(1))
    return logits_TE, stacked_PD


@router_logits_op.register_fake
def _(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    E, D = weight_ED.shape
    logits = x_TD.new_empty((x_TD.shape[0], E), dtype=torch.float32)
    parts = 0 if fp32_kernels(x_TD, weight_ED) else _weight_parts(weight_ED)
    return logits, x_TD.new_empty((parts * E, D), dtype=_BF16)


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """fp32 logits x W^T of a 2-D bf16 `x_TD` and an fp32 or bf16 `weight_ED` (module docstring)."""
    return router_logits_op(x_TD, weight_ED)[0]


@torch.library.custom_op("upcycle::router_logits_backward", mutates_args=())
def router_logits_backward(
    grad_TE: torch.Tensor,
    x_TD: torch.Tensor,
    stacked_PD: torch.Tensor,
    weight_ED: torch.Tensor,
    needs_x: bool,
    needs_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx in bf16, dL/dW in W's dtype) from the forward's stacked weight parts (none: the
    fp32 kernels); a gradient not needed comes back empty."""
    dx_TD = x_TD.new_empty(0)
    dw_ED = weight_ED.new_empty(0)
    if stacked_PD.shape[0] == 0 and weight_ED.shape[0]:
        if needs_x:
            dx_TD = _dx_fp32(grad_TE, weight_ED, x_TD.dtype)
        if needs_weight:
            dw_ED = _dw_fp32(grad_TE, x_TD, weight_ED.dtype)
        return dx_TD, dw_ED
    g = split_bf16(grad_TE, 3) if needs_x or needs_weight else []
    E = weight_ED.shape[0]
    if needs_x:
        # Σ g_i W_j over i + j ≤ 2: every term down to 2^-24 of |g||W| (the dropped ones are
        # smaller), so dL/dx is fp32-accurate before its one rounding to bf16, also where the
        # rows of W share a component that cancels in g W (softmax gradients sum to zero)
        w = stacked_PD.view(-1, E, stacked_PD.shape[1]).unbind(0)
        pairs = [(i, j) for i in range(3) for j in range(len(w)) if i + j <= 2]
        lhs = torch.cat([g[i] for i, _ in pairs], dim=1)
        rhs = torch.cat([w[j] for _, j in pairs])
        dx_TD = _mm_bf16(lhs, rhs)
    if needs_weight:
        g_parts = torch.cat(g, dim=1)  # [T, 3E]
        dw_ED = _sum_parts(_mm_fp32(g_parts.t(), x_TD).view(3, E, x_TD.shape[1]).unbind(0)).to(
            weight_ED.dtype
        )
    return dx_TD, dw_ED


@router_logits_backward.register_fake
def _(grad_TE, x_TD, stacked_PD, weight_ED, needs_x, needs_weight):
    dx = x_TD.new_empty(x_TD.shape if needs_x else (0,))
    dw = weight_ED.new_empty(weight_ED.shape if needs_weight else (0,))
    return dx, dw


def _setup_context(ctx, inputs, output) -> None:
    x_TD, weight_ED = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x_TD, weight_ED, output[1])


def _backward(ctx, grad_TE, _grad_stacked):
    x_TD, weight_ED, stacked_PD = ctx.saved_tensors
    needs_x, needs_weight = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # a backward that is itself differentiated (create_graph=True): the upcast fp32
        # products, which autograd can differentiate again
        grad_TE = grad_TE.float()
        dx = (grad_TE @ weight_ED.float()).to(x_TD.dtype) if needs_x else None
        dw = (grad_TE.t() @ x_TD.float()).to(weight_ED.dtype) if needs_weight else None
        return dx, dw
    dx, dw = router_logits_backward(grad_TE, x_TD, stacked_PD, weight_ED, needs_x, needs_weight)
    return (dx if needs_x else None), (dw if needs_weight else None)


router_logits_op.register_autograd(_backward, setup_context=_setup_context)
