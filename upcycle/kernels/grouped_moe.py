"""Grouped-GEMM routed experts: sort assignments by expert, two grouped GEMMs, weighted sum back.

The fast path of `upcycle.model.moe.MoE` (design.md "Speed", perf.md), tested against the
eager loop in `upcycle.model.moe.eager_experts`. Steps, for T tokens each routed to K experts
(A = T·K assignments):

1. `order_A`: stable argsort of the flattened expert indices, so assignments of one expert are
   contiguous and keep token order. Counts per expert (`dispatch.expert_counts`) and their cumsum stay
   on the device: `torch.bincount` is avoided because on CUDA it reads the maximum back to the
   host, and no `.item()` / `.tolist()` is called on the fast path.
2. Gather the token rows in that order, `h = [x W_gate^T | x W_up^T]` with one grouped GEMM
   for gate and up together (`w_in_EPD` = [E, 2F, D], gate rows first), `a = act(gate) ⊙ up`
   (one fused kernel for SwiGLU, `upcycle.kernels.swiglu`), then one grouped GEMM with
   `w_down_EDF`.
3. Un-permute the rows and take the weighted sum over each token's K experts.

The backward pass is written out (`_GroupedExperts`) rather than left to autograd, for memory
and for fewer passes over [A, ·] tensors. It keeps x_TD, h_AP and (`KEEP_DISPATCHED_ROWS`) the
dispatched rows x_AD: the gradient reaching expert output row (t, k) is dL/dout_t itself
(gathered once, g_AD), so

    d_AF = g_AD W_down[e]                        (grouped GEMM)
    dL/dw_tk = <d_tk, a_tk>,  dL/dh = act'(h) · (w_tk d_tk)   (one fused pass, `swiglu_backward`)
    dW_down[e] = Σ g_a^T (w_a a_a),  dW_in[e] = Σ (dL/dh_a)^T x_a,  dx_AD = dL/dh W_in[e]

with a_AF recomputed from h_AP (and x_AD gathered again from x_TD when not kept). Compared with
autograd over the forward graph this saves the [A, F] activation and the [A, D] expert outputs
(and, not kept, the [A, D] dispatched rows): with 64 experts top-8 every token has K = 8 rows,
so these are the layer's largest tensors (bench/RESULTS.md has the measured activation memory).
Every backward step is a permutation, a GEMM or a sum over K, never an atomic scatter-add with
repeated indices: deterministic on the GPU too.

What runs where (`grouped_mm_available`):
- CUDA, compute capability 9.x/10.x (H100, H200, B200), bf16, torch ≥ 2.8: `torch._grouped_mm`,
  forward and backward, no host synchronisation. Other CUDA dtypes or GPUs: torch's own
  fallback would copy the offsets to the host inside every call, so `auto` picks the eager loop.
- CPU: `torch._grouped_mm` is used in fp32, bf16 and fp16 when this torch has a CPU kernel
  (torch 2.13 has one: a loop of matmuls in C++, forward and backward; probed once per dtype).
- Weight gradients of layers with at most `WGRAD_LOOP_MAX_EXPERTS` experts on CUDA: one cuBLAS
  GEMM per expert on row slices, with counts that reached the host during the forward pass.
- Element-wise glue (SwiGLU, the combine's gather-sum): Triton kernels on CUDA in eager mode,
  torch expressions elsewhere (`upcycle.kernels.swiglu`, `upcycle.kernels.combine`).
- Opt-in (`GATHER_GEMM`): the three row gathers fused into Triton grouped GEMMs that read token
  rows by index (`upcycle.kernels.gather_gemm`), on CUDA; off until measured faster.
- Under `torch.compile`, gated SiLU experts on `torch._grouped_mm` are two custom operators
  (`upcycle.kernels.moe_ops`) that run `experts_forward` / `experts_backward` as in eager mode,
  Triton glue included; other activations are traced op by op into the graph.
- Anything else (fp64, older torch, widths D or F that are not multiples of 16 bytes as the
  kernel's strides require): a segment loop over `torch.split` of the sorted rows. It reads the
  per-expert counts back once per call (one host sync, free on the CPU); exact in fp64, which the
  exactness tests use.

Shape letters: T tokens, D model width, F expert width, E experts, K experts per token,
A = T·K assignments, P width of the first projection (2F gated, F otherwise), I/O the input and
output widths of one grouped GEMM.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch.torch_version import TorchVersion

from upcycle.kernels import swiglu
from upcycle.kernels.combine import gather_sum
from upcycle.kernels.dispatch import expert_counts, sort_by_expert
from upcycle.kernels.gather_gemm import gather_grouped_mm, gather_grouped_wgrad
from upcycle.kernels.host_copy import HostCopy
from upcycle.kernels.trace import trace_constant

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


@trace_constant
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


def grouped_weight_grad(
    g_AO: torch.Tensor,
    x_AI: torch.Tensor,
    offsets_E: torch.Tensor | None,
    split_sizes: list[int] | None,
    num_experts: int,
) -> torch.Tensor:
    """dW_EOI: Σ over the rows of expert e of g_a^T x_a (the weight gradient of `grouped_linear`).

    Experts without rows get zeros. With `split_sizes` (host counts): one GEMM per expert on row
    slices, written straight into its slot of the result; otherwise `torch._grouped_mm` with the
    offsets on the reduced dimension.
    """
    if g_AO.shape[0] == 0:  # no rows at all (an expert-parallel rank that got no token)
        return g_AO.new_zeros(num_experts, g_AO.shape[1], x_AI.shape[1])
    if split_sizes is None:
        assert offsets_E is not None
        return torch._grouped_mm(g_AO.t(), x_AI, offs=offsets_E)
    out_EOI = g_AO.new_empty(num_experts, g_AO.shape[1], x_AI.shape[1])
    # The views come from one split / unbind call each, not sliced per expert: the host issues
    # these GEMMs one by one in backward, and each takes about 70 µs on an H100 in the
    # Mixtral-shaped step, so the loop's own Python time decides whether the GPU waits for it
    # (bench/RESULTS.md, seventh round: 248 gaps a step before these GEMMs).
    parts = zip(g_AO.split(split_sizes), x_AI.split(split_sizes), out_EOI.unbind(0), strict=True)
    for g_rO, x_rI, out_OI in parts:
        if g_rO.shape[0]:
            torch.mm(g_rO.t(), x_rI, out=out_OI)
        else:
            out_OI.zero_()
    return out_EOI


# Layers with at most this many experts compute their weight gradients with one cuBLAS GEMM
# per expert instead of `torch._grouped_mm`: with few, large groups the grouped kernel's reduction
# over rows was the slowest GEMM of the layer (H100, bench/grouped_gemm.py: 0.68 of a dense
# GEMM at 8 experts of 14336, 0.87 at 8 of 8192; 0.86–0.97 at 64 experts, which keep it).
# The per-expert counts reach the host by a copy started in the forward pass, so the backward
# pass reads them without waiting for the GPU. 0 turns this off.
WGRAD_LOOP_MAX_EXPERTS = 16


# Opt-in: the row gathers fused into Triton grouped GEMMs (`upcycle.kernels.gather_gemm`), in
# place of index_select + torch._grouped_mm. Off until a GPU benchmark shows it faster
# (bench/moe_layer.py, row "ours grouped, fused gathers").
GATHER_GEMM = False


# The dispatched rows x_AD (the layer input gathered in expert order, A = T·K rows) are kept from
# the forward pass for the first GEMM's weight gradient instead of gathered again in backward:
# one [A, D] gather less per layer and step (S2 of perf.md, 64 experts top-8, on an H100: 10.19
# against 10.43 ms, bench/RESULTS.md sixth round) for K times the layer input of activation
# memory (S2: 0.88 of a dense layer of equal active parameters, against 0.70).
# Kept only when the expert weights get gradients; activation checkpointing drops them like any
# saved activation. False: gather them again (the lower-memory choice).
KEEP_DISPATCHED_ROWS = True
# The same choice for compiled graphs (the custom operators of `upcycle.kernels.moe_ops`), off:
# there the kept rows made the compiled Mixtral-shaped training step of perf.md slower, not faster
# (H100, bench/RESULTS.md sixth round: 60.3 and 60.7 ms per step against 54.9 ms gathering again).
KEEP_DISPATCHED_ROWS_COMPILED = False


def use_gather_gemm(x_TD: torch.Tensor, offsets_E: torch.Tensor | None) -> bool:
    """Whether the expert path reads token rows inside its GEMMs (`GATHER_GEMM`): on CUDA, or
    on the CPU under Triton's interpreter (the tests), with device offsets (native grouped path)."""
    return (
        GATHER_GEMM
        and offsets_E is not None
        and not torch.compiler.is_compiling()
        and swiglu.triton_installed()
        and (x_TD.is_cuda or swiglu.triton_interpreted())
    )


def experts_forward(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    w_in_EPD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    order_A: torch.Tensor,
    inverse_A: torch.Tensor,
    offsets_E: torch.Tensor | None,
    split_sizes: list[int] | None,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
    gather_gemm: bool = False,
    keep_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out_TD, h_AP, x_AD or None): the expert path's forward pass, shared by `_GroupedExperts`
    and the compiled graphs' custom op (`upcycle.kernels.moe_ops`). `gather_gemm`: the first GEMM
    reads the token rows by index (`use_gather_gemm`); `keep_rows`: return the dispatched rows
    x_AD for the backward pass (`KEEP_DISPATCHED_ROWS`; not with `gather_gemm`, which has none)."""
    K = weights_TK.shape[1]
    token_A = token_rows(order_A, K)
    x_AD = None
    if gather_gemm:
        assert offsets_E is not None and not keep_rows
        h_AP = gather_grouped_mm(x_TD, token_A, w_in_EPD, offsets_E, "nk")
    else:
        x_AD = x_TD.index_select(0, token_A)
        h_AP = grouped_linear(x_AD, w_in_EPD, offsets_E, split_sizes)
        if not keep_rows:
            x_AD = None  # freed before the activation and the second GEMM
    a_AF = _activate(h_AP, activation, gated)
    y_AD = grouped_linear(a_AF, w_down_EDF, offsets_E, split_sizes)
    del a_AF
    return gather_sum(y_AD, inverse_A, weights_TK, K), h_AP, x_AD


def experts_backward(
    grad_TD: torch.Tensor,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    w_in_EPD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    order_A: torch.Tensor,
    inverse_A: torch.Tensor,
    h_AP: torch.Tensor | list[torch.Tensor],
    offsets_E: torch.Tensor | None,
    split_sizes: list[int] | None,
    wgrad_sizes: list[int] | None,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
    needs_grad: tuple[bool, bool, bool, bool],
    in_place: bool = False,
    gather_gemm: bool = False,
    rows_AD: torch.Tensor | list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx_TD, dweights_TK, dw_in_EPD, dw_down_EDF), each None where `needs_grad` says so.

    `wgrad_sizes`: per-expert row counts on the host for the per-expert weight-gradient GEMMs
    (None: `torch._grouped_mm`, or `split_sizes`' segment loop). `in_place`: the SwiGLU kernel
    writes over h_AP (the caller gives it up). `h_AP` may come in a one-element list, which is
    emptied, so that no reference outside this function keeps it alive. `gather_gemm`: the
    GEMMs read token rows by index instead of from gathered copies (`use_gather_gemm`; the
    per-expert weight-gradient GEMMs are then not used). `rows_AD`: the dispatched rows kept by
    the forward pass (None: gathered again from x_TD), also possibly in a one-element list.
    """
    if isinstance(h_AP, list):
        h_AP = h_AP.pop()
    if isinstance(rows_AD, list):
        rows_AD = rows_AD.pop()
    needs_x, needs_weights, needs_w_in, needs_w_down = needs_grad
    T, K = weights_TK.shape
    E = w_in_EPD.shape[0]
    token_A = token_rows(order_A, K)
    # The output gradient in the dtype the experts computed in (autocast may hand fp32).
    grad_TD = grad_TD.to(x_TD.dtype).contiguous()
    # dL/dy for each assignment, before its combine weight: the output gradient of its token.
    if gather_gemm:
        assert offsets_E is not None
        g_AD = None
        d_AF = gather_grouped_mm(grad_TD, token_A, w_down_EDF, offsets_E, "kn")
    else:
        g_AD = grad_TD.index_select(0, token_A)
        d_AF = grouped_linear(g_AD, w_down_EDF.transpose(-2, -1), offsets_E, split_sizes)
    w_A = weights_TK.reshape(-1).index_select(0, order_A)
    dh_AP, dw_A, a_w_AF = _activate_backward(h_AP, d_AF, w_A, activation, gated, in_place)
    del d_AF, h_AP
    grad_w_down = grad_w_in = grad_x = grad_weights = None
    wgrad_sizes = split_sizes if wgrad_sizes is None else wgrad_sizes
    if needs_w_down and gather_gemm:
        grad_w_down = gather_grouped_wgrad(grad_TD, token_A, a_w_AF, None, offsets_E)
    elif needs_w_down:
        grad_w_down = grouped_weight_grad(g_AD, a_w_AF, offsets_E, wgrad_sizes, E)
    del g_AD, a_w_AF
    if needs_w_in and gather_gemm:
        grad_w_in = gather_grouped_wgrad(dh_AP, None, x_TD, token_A, offsets_E)
    elif needs_w_in:
        x_AD = x_TD.index_select(0, token_A) if rows_AD is None else rows_AD
        del rows_AD
        grad_w_in = grouped_weight_grad(dh_AP, x_AD, offsets_E, wgrad_sizes, E)
        del x_AD
    if needs_x:
        dx_AD = grouped_linear(dh_AP, w_in_EPD.transpose(-2, -1), offsets_E, split_sizes)
        del dh_AP
        grad_x = gather_sum(dx_AD, inverse_A, None, K)
    if needs_weights:
        grad_weights = dw_A.index_select(0, inverse_A).view(T, K).to(weights_TK.dtype)
    return grad_x, grad_weights, grad_w_in, grad_w_down


def token_rows(order_A: torch.Tensor, K: int) -> torch.Tensor:
    """The token of each expert-sorted assignment (assignment a = t·K + k)."""
    return torch.div(order_A, K, rounding_mode="floor")


def wants_host_counts(x_TD: torch.Tensor, num_experts: int) -> bool:
    """Whether the weight gradients take one GEMM per expert (`WGRAD_LOOP_MAX_EXPERTS`), for
    which the forward pass starts the copy of the row counts to the host. Never while a CUDA
    graph is captured or inside `device_counts_only` (`upcycle.train.cuda_graph`): a replay
    would reuse the counts of the capture, and the backward pass could not wait for them;
    `torch._grouped_mm` then computes the weight gradients from the counts on the device."""
    return (
        x_TD.is_cuda
        and num_experts <= WGRAD_LOOP_MAX_EXPERTS
        and not _device_counts_only
        and not torch.cuda.is_current_stream_capturing()
    )


_device_counts_only = 0


@contextlib.contextmanager
def device_counts_only():
    """Inside: no host counts (`wants_host_counts` is False), as in a captured CUDA graph; the
    step that warms up a capture runs this way, so that it runs what the graph will."""
    global _device_counts_only
    _device_counts_only += 1
    try:
        yield
    finally:
        _device_counts_only -= 1


def sizes_from_offsets(offsets_E: list[int]) -> list[int]:
    """Per-expert row counts from their cumulative sums."""
    return [end - start for start, end in zip([0, *offsets_E[:-1]], offsets_E, strict=True)]


class _GroupedExperts(torch.autograd.Function):
    """The whole routed-expert computation with a backward pass written out (see `grouped_moe`).

    Saved for backward: the layer input x_TD (kept alive by the caller anyway), the first GEMM's
    output h_AP, the dispatched rows x_AD (`KEEP_DISPATCHED_ROWS`, when the expert weights get
    gradients; otherwise gathered again from x_TD), the routing permutation and the weights. Not
    saved: the activation a_AF (recomputed from h_AP, fused with its gradient for SwiGLU) and the
    expert outputs y_AD: the combine weights' gradient is
    <dL/dout_t, y_tk> = <W_down^T dL/dout_t, a_tk>, which the backward pass has at hand.
    Every backward step is a permutation, a GEMM or a sum over K (no atomic scatter-add with
    repeated indices): deterministic on the GPU too.

    With the Triton SwiGLU kernels (CUDA, eager, no saved-tensor hooks such as activation
    checkpointing), h_AP and x_AD are held on `ctx` instead of saved, the backward pass writes
    dL/dh over h_AP and lets x_AD go right after its one use: the layer's backward then never
    holds more than h_AP, two [A, D] tensors and one [A, F] tensor at once. The price is that
    this backward can run
    once only (no `retain_graph=True`), which a second call reports.
    """

    @staticmethod
    def forward(
        ctx,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        w_in_EPD: torch.Tensor,
        w_down_EDF: torch.Tensor,
        order_A: torch.Tensor,
        inverse_A: torch.Tensor,
        offsets_E: torch.Tensor | None,
        split_sizes: list[int] | None,
        activation: Callable[[torch.Tensor], torch.Tensor],
        gated: bool,
        host_counts: HostCopy | None = None,
        keep_rows: bool = False,
    ) -> torch.Tensor:
        # `keep_rows` comes from the caller: grad mode is off inside forward, and needs_input_grad
        # does not see an enclosing no_grad.
        ctx.gather_gemm = use_gather_gemm(x_TD, offsets_E)
        keep_rows = keep_rows and not ctx.gather_gemm
        out_TD, h_AP, rows_AD = experts_forward(
            x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, offsets_E, split_sizes, activation, gated,
            ctx.gather_gemm, keep_rows,
        )  # fmt: skip
        ctx.in_place = (
            gated and _is_silu(activation) and swiglu.use_triton(h_AP) and not saved_tensor_hooks_active()
        )
        ctx.h_AP = h_AP if ctx.in_place else None
        ctx.rows_AD = rows_AD if ctx.in_place else None
        saved_h, saved_rows = (None, None) if ctx.in_place else (h_AP, rows_AD)
        ctx.save_for_backward(
            x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, saved_h, offsets_E, saved_rows
        )
        ctx.split_sizes, ctx.activation, ctx.gated = split_sizes, activation, gated
        ctx.host_counts = host_counts
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD: torch.Tensor):
        x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, saved_h, offsets_E, saved_rows = (
            ctx.saved_tensors
        )
        wgrad_sizes = None
        if ctx.split_sizes is None and ctx.host_counts is not None:
            wgrad_sizes = ctx.host_counts.tolist()  # long since copied by now
        # In place, h and the kept rows go to experts_backward in lists it empties, with no
        # reference left here (an argument would stay referenced by this frame), so that each is
        # freed as soon as experts_backward is done with it.
        rows = [ctx.rows_AD] if ctx.rows_AD is not None else saved_rows  # on ctx only in place
        ctx.rows_AD = None
        grads = experts_backward(
            grad_TD, x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A,
            [_GroupedExperts._take_h(ctx)] if ctx.in_place else saved_h, offsets_E,
            ctx.split_sizes, wgrad_sizes, ctx.activation, ctx.gated, tuple(ctx.needs_input_grad[:4]),
            in_place=ctx.in_place, gather_gemm=ctx.gather_gemm, rows_AD=rows,
        )  # fmt: skip
        return *grads, None, None, None, None, None, None, None, None

    @staticmethod
    def _take_h(ctx) -> torch.Tensor:
        """h_AP held on ctx by an in-place forward; ctx lets go of it (one backward only)."""
        if ctx.h_AP is None:
            raise RuntimeError(
                "the grouped MoE path reuses its saved activation during backward, so it can be "
                "differentiated once only; for retain_graph=True or double backward set "
                "moe.implementation: eager"
            )
        h_AP, ctx.h_AP = ctx.h_AP, None
        return h_AP


def saved_tensor_hooks_active() -> bool:
    """True inside `saved_tensors_hooks` (activation checkpointing, offloading to the CPU).

    h_AP then goes through `save_for_backward`, so that the hooks can drop or move it; a tensor
    held on `ctx` would stay on the GPU until backward. Unknown (a torch without the query): True.
    """
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is None or top_hooks(False) is not None


def _is_silu(activation: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    return activation is torch.nn.functional.silu


def _activate(
    h_AP: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor], gated: bool
) -> torch.Tensor:
    if gated and _is_silu(activation):
        return swiglu.swiglu_forward(h_AP)
    if gated:
        gate_AF, up_AF = h_AP.chunk(2, dim=-1)
        return activation(gate_AF) * up_AF
    return activation(h_AP)


def _activate_backward(
    h_AP: torch.Tensor,
    d_AF: torch.Tensor,
    w_A: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dh_AP, dL/dw_A, w·a_AF) from the un-weighted output gradient d_AF of the activation;
    `in_place` lets the SwiGLU kernel reuse h's and d's memory (the caller gives both up)."""
    if gated and _is_silu(activation):
        return swiglu.swiglu_backward(h_AP, d_AF, w_A, in_place=in_place)
    # Any other activation: recompute it and take its vector-Jacobian product (torch.func, which
    # torch.compile traces into the same graph; torch.autograd.grad here would break it).
    w_A1 = w_A.to(h_AP.dtype)[:, None]
    a_AF, vjp = torch.func.vjp(lambda h: _activate(h, activation, gated), h_AP)
    (dh_AP,) = vjp(d_AF * w_A1)
    compute = torch.promote_types(a_AF.dtype, torch.float32)
    dw_A = (d_AF.to(compute) * a_AF.to(compute)).sum(dim=-1)
    return dh_AP, dw_A, a_AF * w_A1


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
    (empty groups); their weight gradients are zero. Forward and backward are written out in
    `_GroupedExperts`, which keeps one [A, P] tensor per layer for backward and, training the
    experts with `KEEP_DISPATCHED_ROWS`, one [A, D] tensor.
    """
    E, _, D = w_in_EPD.shape
    F = w_down_EDF.shape[-1]
    expert_A = indices_TK.reshape(-1)
    order_A, inverse_A = sort_by_expert(expert_A, E)
    counts_E = expert_counts(indices_TK, E)

    native = grouped_mm_available(x_TD.device, x_TD.dtype, (D, F))
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32) if native else None
    split_sizes = None if native else counts_E.tolist()
    if offsets_E is not None and gated and _is_silu(activation) and torch.compiler.is_compiling():
        # one node of the compiled graph that runs the eager path (upcycle.kernels.moe_ops)
        from upcycle.kernels import moe_ops

        keep_counts = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x_TD, weights_TK, w_in_EPD, w_down_EDF)
        )
        keep_rows = _keeps_rows(KEEP_DISPATCHED_ROWS_COMPILED and not GATHER_GEMM, w_in_EPD)
        out_TD, _, _ = moe_ops.swiglu_experts(
            x_TD, weights_TK, w_in_EPD, w_down_EDF, order_A, inverse_A, offsets_E, keep_counts, keep_rows
        )
        return out_TD
    host_counts = None
    if (  # is_compiling first: the compiled path never reads counts, nor traces the check
        not torch.compiler.is_compiling()
        and native
        and wants_host_counts(x_TD, E)
        and torch.is_grad_enabled()
    ):
        host_counts = HostCopy(counts_E)  # read by the backward pass
    return _GroupedExperts.apply(
        x_TD,
        weights_TK,
        w_in_EPD,
        w_down_EDF,
        order_A,
        inverse_A,
        offsets_E,
        split_sizes,
        activation,
        gated,
        host_counts,
        _keeps_rows(KEEP_DISPATCHED_ROWS, w_in_EPD),
    )


def _keeps_rows(switch: bool, w_in_EPD: torch.Tensor) -> bool:
    """Whether the forward pass keeps the dispatched rows: the switch is on and a backward pass
    will compute the first GEMM's weight gradient (decided here, outside the autograd Function,
    where grad mode is still the caller's)."""
    return switch and torch.is_grad_enabled() and w_in_EPD.requires_grad
