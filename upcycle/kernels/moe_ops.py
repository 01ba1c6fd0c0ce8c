"""The SwiGLU expert path as two custom operators, so compiled graphs run the eager fast path.

Under `torch.compile`, `upcycle.kernels.grouped_moe` would otherwise be traced op by op: inductor
then generates its own kernels for the glue between the grouped GEMMs (gathers, SwiGLU and its
gradient, the combine), and the Triton kernels of `swiglu` / `combine` never run (bench/RESULTS.md,
"Speed issue, second round": the compiled MoE layer was slower than the eager one on every shape,
and 6.2 ms of the compiled Mixtral step was this glue). Registered as operators, the forward and
backward passes are single nodes of the compiled graph that execute exactly the eager code:

- `upcycle::swiglu_experts(x, weights, w_in, w_down, order, inverse, offsets, keep_counts,
  keep_rows) -> (out, h, rows)`: `grouped_moe.experts_forward` for gated SiLU experts on
  `torch._grouped_mm` (`offsets` are the int32 cumulative row counts on the device);
  `h` = [x W_gate^T | x W_up^T] and, with `keep_rows`
  (`grouped_moe.KEEP_DISPATCHED_ROWS_COMPILED`), the dispatched rows x_AD are kept for backward,
  returned so that autograd saves them (`rows` is an empty [0, D] tensor without `keep_rows`).
- `upcycle::swiglu_experts_backward(grad, x, weights, w_in, w_down, order, inverse, h, rows,
  offsets, needs_x, needs_weights, needs_w_in, needs_w_down) -> (dx, dweights, dw_in, dw_down)`:
  `grouped_moe.experts_backward`; a gradient that is not needed comes back as an empty tensor.

Both have fake (meta) implementations for tracing, `register_autograd` ties them together, and
the rest of the layer (router, sort, offsets) stays in inductor's hands.

The per-expert weight-gradient GEMMs of layers with few experts (`grouped_moe.wants_host_counts`)
need the row counts on the host. A host list cannot cross a graph, so the forward operator starts
their copy (`HostCopy`) and files it under its output h in a weak dictionary; the backward
operator, which receives that same h, takes it from there. Where it does not find it (h reached
backward as another tensor object) the weight gradients run on `torch._grouped_mm`: the same
result, never a wrong one. Both operators are tagged `cudagraph_unsafe` (a replayed graph would
reuse the counts of its capture) and file or read no counts while a CUDA graph is captured.

The opt-in gathered GEMMs (`grouped_moe.GATHER_GEMM`) are consulted by each operator when it runs
(eager mode decides once, in forward), unless the rows are kept (`keep_rows`, decided when the
graph is traced, and only where `GATHER_GEMM` was off then): kept rows replace the gathers of
forward and backward alike. Every choice gives the same gradients, since forward and backward
share only h, the counts and the rows, which are the same rows either way. Not carried over from the eager path: the SwiGLU gradient
written over h (an operator may not mutate a saved input behind the compiler's back).

tests/test_compile.py checks the operators with `torch.library.opcheck` and a compiled layer
against the eager one, bit for bit on the CPU.

Shape letters as in `upcycle.kernels.grouped_moe`.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from upcycle.kernels import grouped_moe
from upcycle.kernels.host_copy import HostCopy

_SILU = torch.nn.functional.silu
# h_AP of a forward call -> its cumulative row counts on their way to the host
_HOST_OFFSETS = WeakTensorKeyDictionary()


# A CUDA graph would replay the host counts of its capture: the operators must stay outside one.
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@torch.library.custom_op("upcycle::swiglu_experts", mutates_args=(), tags=_TAGS)
def swiglu_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    w_in_EPD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    order_A: torch.Tensor,
    inverse_A: torch.Tensor,
    offsets_E: torch.Tensor,
    keep_counts: bool,
    keep_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`keep_counts` (decided when the graph is traced: a backward pass will follow): start the
    row counts' copy to the host for the per-expert weight gradients. It is queued before the
    GEMMs, so that the backward pass finds it done, or waits only while the GPU still has this
    forward's work queued (a forward recomputed by activation checkpointing). `keep_rows` (also
    decided when traced): return the dispatched rows for the backward pass."""
    pending = None
    if keep_counts and grouped_moe.wants_host_counts(x_TD, w_in_EPD.shape[0]):
        pending = HostCopy(offsets_E)
    out_TD, h_AP, rows_AD = grouped_moe.experts_forward(
        x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, offsets_E, None, _SILU, True,
        not keep_rows and grouped_moe.use_gather_gemm(x_TD, offsets_E), keep_rows,
    )  # fmt: skip
    if pending is not None:
        _HOST_OFFSETS[h_AP] = pending
    return out_TD, h_AP, rows_AD if rows_AD is not None else _no_rows(x_TD)


def _no_rows(x_TD: torch.Tensor) -> torch.Tensor:
    return x_TD.new_empty(0, x_TD.shape[1])


@swiglu_experts.register_fake
def _swiglu_experts_fake(
    x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, offsets_E, keep_counts, keep_rows
):  # fmt: skip
    rows = x_TD.new_empty(order_A.shape[0], x_TD.shape[1]) if keep_rows else _no_rows(x_TD)
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(order_A.shape[0], w_in_EPD.shape[1]), rows


@torch.library.custom_op("upcycle::swiglu_experts_backward", mutates_args=(), tags=_TAGS)
def swiglu_experts_backward(
    grad_TD: torch.Tensor,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    w_in_EPD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    order_A: torch.Tensor,
    inverse_A: torch.Tensor,
    h_AP: torch.Tensor,
    rows_AD: torch.Tensor,
    offsets_E: torch.Tensor,
    needs_x: bool,
    needs_weights: bool,
    needs_w_in: bool,
    needs_w_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    needs = (needs_x, needs_weights, needs_w_in, needs_w_down)
    pending = _HOST_OFFSETS.pop(h_AP, None)
    wgrad_sizes = None
    if pending is not None and not _capturing(h_AP):
        wgrad_sizes = grouped_moe.sizes_from_offsets(pending.tolist())
    # rows kept by the forward (an empty [0, D] tensor when not kept; A = 0 reads the same either way)
    kept = rows_AD if rows_AD.shape[0] == order_A.shape[0] else None
    grads = grouped_moe.experts_backward(
        grad_TD, x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, h_AP, offsets_E,
        None, wgrad_sizes, _SILU, True, needs,
        gather_gemm=kept is None and grouped_moe.use_gather_gemm(x_TD, offsets_E), rows_AD=kept,
    )  # fmt: skip
    return tuple(
        grad if grad is not None else _not_needed(like)
        for grad, like in zip(grads, (x_TD, weights_TK, w_in_EPD, w_down_EDF), strict=True)
    )


def _not_needed(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@swiglu_experts_backward.register_fake
def _swiglu_experts_backward_fake(
    grad_TD, x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, h_AP, rows_AD, offsets_E,
    needs_x, needs_weights, needs_w_in, needs_w_down,
):  # fmt: skip
    pairs = ((needs_x, x_TD), (needs_weights, weights_TK), (needs_w_in, w_in_EPD), (needs_w_down, w_down_EDF))
    return tuple(torch.empty_like(like) if needed else _not_needed(like) for needed, like in pairs)


def _setup_context(ctx, inputs, output) -> None:
    x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, offsets_E, _, _ = inputs
    _, h_AP, rows_AD = output
    ctx.mark_non_differentiable(h_AP, rows_AD)
    ctx.save_for_backward(
        x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, h_AP, rows_AD, offsets_E
    )


def _backward(ctx, grad_TD, _grad_h, _grad_rows):
    x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, h_AP, rows_AD, offsets_E = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:4])
    grads = swiglu_experts_backward(
        grad_TD, x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, h_AP, rows_AD, offsets_E, *needs
    )
    return (
        *(grad if needed else None for grad, needed in zip(grads, needs, strict=True)),
        None,
        None,
        None,
        None,
        None,
    )


swiglu_experts.register_autograd(_backward, setup_context=_setup_context)
