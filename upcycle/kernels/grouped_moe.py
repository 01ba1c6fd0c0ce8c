"""Grouped-GEMM routed experts: sort assignments by expert, two grouped GEMMs, weighted sum back.

The fast path of `upcycle.model.moe.MoE` (design.md "Speed", perf.md), tested against the
eager loop in `upcycle.model.moe.eager_experts`. Steps, for T tokens each routed to K experts
(A = T·K assignments):

1. `order_A`: stable argsort of the flattened expert indices, so assignments of one expert are
   contiguous and keep token order. Counts per expert by `scatter_add_` and their cumsum stay
   on the device: `torch.bincount` is avoided because on CUDA it reads the maximum back to the
   host, and no `.item()` / `.tolist()` is called on the fast path.
2. Gather the token rows in that order, `h = act(x W_gate^T) ⊙ x W_up^T` with one grouped GEMM
   for gate and up together (`w_in_EPD` = [E, 2F, D], gate rows first), then one grouped GEMM
   with `w_down_EDF`.
3. Un-permute the rows and take the weighted sum over each token's K experts.
Every backward pass is a permutation or a sum over K, never an atomic scatter-add with
repeated indices: the result is deterministic on the GPU too.

What runs where (`grouped_mm_available`):
- CUDA, compute capability 9.x/10.x (H100, H200, B200), bf16, torch ≥ 2.8: `torch._grouped_mm`,
  forward and backward, no host synchronisation. Other CUDA dtypes or GPUs: torch's own
  fallback would copy the offsets to the host inside every call, so `auto` picks the eager loop.
- CPU: `torch._grouped_mm` is used in fp32, bf16 and fp16 when this torch has a CPU kernel
  (torch 2.13 has one: a loop of matmuls in C++, forward and backward; probed once per dtype).
- Anything else (fp64, older torch, widths D or F that are not multiples of 16 bytes as the
  kernel's strides require): a segment loop over `torch.split` of the sorted rows. It reads the
  per-expert counts back once per call (one host sync, free on the CPU); exact in fp64, which the
  exactness tests use.

Shape letters: T tokens, D model width, F expert width, E experts, K experts per token,
A = T·K assignments, P width of the first projection (2F gated, F otherwise), I/O the input and
output widths of one grouped GEMM.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.torch_version import TorchVersion

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BMM_COMBINE_MIN_K = 8


@functools.cache
def _cpu_grouped_mm_works(dtype: torch.dtype) -> bool:
    """Run a tiny grouped GEMM forward and backward on the CPU; False if this torch refuses."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.ones(4, 8, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 8, 8, dtype=dtype, requires_grad=True)
            offsets = torch.tensor([1, 4], dtype=torch.int32)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
            y.backward(torch.ones_like(y))
        return bool(torch.equal(y.detach(), torch.full((4, 8), 8.0, dtype=dtype)))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_available(
    device: torch.device | str, dtype: torch.dtype, widths: tuple[int, ...] = ()
) -> bool:
    """True where `torch._grouped_mm` runs natively (no host sync) with autograd for `dtype`.

    `widths`: the row widths the GEMMs will see (D, F); each must span a multiple of 16 bytes.
    Under torch.compile the answer is a constant of the trace (no graph break), and only bf16
    qualifies: the fake-tensor rule of `_grouped_mm` accepts bf16 alone, although the CPU
    kernel runs fp32 eagerly.
    """
    device = torch.device(device)
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    return _grouped_mm_available(device.type, device.index, dtype, tuple(int(w) for w in widths))


@torch.compiler.assume_constant_result
def _grouped_mm_available(
    device_type: str, index: int | None, dtype: torch.dtype, widths: tuple[int, ...]
) -> bool:
    if not hasattr(torch, "_grouped_mm") or dtype not in _GROUPED_MM_DTYPES:
        return False
    if any(width * dtype.itemsize % 16 != 0 for width in widths):
        return False
    if device_type == "cpu":
        return _cpu_grouped_mm_works(dtype)
    if device_type != "cuda" or torch.version.hip is not None or dtype != torch.bfloat16:
        return False
    if TorchVersion(torch.__version__) < "2.8":
        return False
    major, _ = torch.cuda.get_device_capability(torch.device(device_type, index))
    return major in (9, 10)


def grouped_linear(
    x_AI: torch.Tensor,
    w_EOI: torch.Tensor,
    offsets_E: torch.Tensor | None,
    split_sizes: list[int] | None,
) -> torch.Tensor:
    """y_AO: row a times w[e]^T for its expert e; rows sorted by expert.

    `offsets_E` (int32 cumulative counts, on the device) selects `torch._grouped_mm`;
    otherwise `split_sizes` (host counts) drive a segment loop.
    """
    if offsets_E is not None:
        return torch._grouped_mm(x_AI, w_EOI.transpose(-2, -1), offs=offsets_E)
    assert split_sizes is not None
    # unbind, not w_EOI[e]: its backward stacks the E gradients once instead of E full-size adds.
    segments = [
        torch.nn.functional.linear(x_cI, w_OI)
        for x_cI, w_OI in zip(x_AI.split(split_sizes), w_EOI.unbind(0), strict=True)
    ]
    return torch.cat(segments)


class _DispatchRows(torch.autograd.Function):
    """x_AD = x_TD[order_A // K]: each token's row once per assignment, in expert order.

    The plain `index_select` backward would scatter-add K rows into each token with atomics
    (order-dependent on the GPU). Here the backward un-permutes the gradient with `inverse_A`
    and sums each token's K rows: deterministic, and no [A, D] broadcast copy in the forward.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, order_A: torch.Tensor, inverse_A: torch.Tensor, top_k: int):
        ctx.save_for_backward(inverse_A)
        ctx.top_k = top_k
        return x_TD.index_select(0, torch.div(order_A, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_AD: torch.Tensor):
        (inverse_A,) = ctx.saved_tensors
        A, D = grad_AD.shape
        grad_TKD = grad_AD.index_select(0, inverse_A).view(A // ctx.top_k, ctx.top_k, D)
        return grad_TKD.sum(dim=1), None, None, None


def grouped_moe(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    w_in_EPD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
) -> torch.Tensor:
    """Σ_k weights[t, k] · expert_{indices[t, k]}(x_t) for every token t, as out_TD.

    `weights_TK` must already have the dtype of `x_TD`. Experts that receive no token are fine
    (empty groups); their weight gradients are zero.
    """
    T, K = indices_TK.shape
    E, _, D = w_in_EPD.shape
    F = w_down_EDF.shape[-1]
    A = T * K
    expert_A = indices_TK.reshape(-1)
    order_A = torch.argsort(expert_A, stable=True)
    inverse_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(A, device=order_A.device))
    counts_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device)
    counts_E.scatter_add_(0, expert_A, torch.ones_like(expert_A))

    native = grouped_mm_available(x_TD.device, x_TD.dtype, (D, F))
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32) if native else None
    split_sizes = None if native else counts_E.tolist()

    x_AD = _DispatchRows.apply(x_TD, order_A, inverse_A, K)
    h_AP = grouped_linear(x_AD, w_in_EPD, offsets_E, split_sizes)
    if gated:
        gate_AF, up_AF = h_AP.chunk(2, dim=-1)
        h_AF = activation(gate_AF) * up_AF
    else:
        h_AF = activation(h_AP)
    y_AD = grouped_linear(h_AF, w_down_EDF, offsets_E, split_sizes)

    # Back to token order (a permutation: its backward has no colliding indices), then the
    # weighted sum over K. A batched [1, K] × [K, D] product skips the [A, D] temporary of
    # multiply-and-sum; on an H100 (bf16, fwd+bwd) it was 4% faster at K = 8 but 5–30% slower
    # at K = 2 and 4, hence the switch.
    y_TKD = y_AD.index_select(0, inverse_A).view(T, K, D)
    if K >= _BMM_COMBINE_MIN_K:
        return torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)
    return (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1)
