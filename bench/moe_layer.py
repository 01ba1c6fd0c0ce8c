"""One MoE SwiGLU layer, bf16 forward + backward: upcycle against transformers and a dense ceiling.

perf.md's protocol in one process on one GPU. For each shape (S1, S2, S3 of perf.md):

- `dense_ref`: a dense SwiGLU FFN of width K·F on the same T tokens (the same FLOPs; the
  practical ceiling of the layer).
- `hf eager` / `hf grouped_mm`: transformers' `MixtralSparseMoeBlock` (router + `MixtralExperts`)
  with `config._experts_implementation` set to `"eager"` / `"grouped_mm"`.
- `ours eager` / `ours grouped`: `upcycle.model.moe.MoE` with `implementation` eager / grouped.
- `ours grouped skew`: the grouped path on inputs engineered so that the most loaded expert gets
  4× the mean load (the realised load is measured, not assumed), against `ours grouped` on
  ordinary inputs.
- `ours grouped compiled` (unless `--no-compile`): `torch.compile` of the same module, its
  compile time reported apart from the timed steps.

All MoE implementations share the same parameter tensors (our MoE's names match HF's block:
`gate.weight` [E, D], `experts.gate_up_proj` [E, 2F, D], `experts.down_proj` [E, D, F]), drawn
from N(0, 0.02²). Our MoE routes like HF's block (softmax over all E, top-K, renormalised:
`softmax_topk` with `renormalize`) and has no auxiliary loss here (HF's block computes none), so
every implementation computes the same function.

Correctness first, in the same run, on fresh random inputs (not the timing inputs): output,
input gradient and `gate_up_proj` gradient against an fp32 reference written here (an expert
loop in fp32 on the upcast bf16 weights and inputs), ‖a − ref‖ / ‖ref‖ ≤ 1e-2 and no NaN. The
reference routes on real router logits: fp32 logits for ours (our router computes them in
fp32), and the logit values of HF's own bf16 router for HF's block (whose top-K is taken on
bf16 logits; a near-tie rounded differently would otherwise send a token to another expert),
with fp32 gradients through the router either way.

Timing: warm-up steps, then the median of ≥ 15 timed steps with CUDA events. A step is zeroing
the gradients, the forward and the backward. Peak memory (`max_memory_allocated`, reset per
implementation) is taken on one extra step; `act GiB` is that peak minus what was allocated
before the step (weights, inputs) minus the gradients the step produces: the activations and
temporaries. TFLOP/s = 6·T·K·3·D·F / t for every row; `layer_eff` = t(dense_ref) / t(impl);
MFU against the 8192³ bf16 matmul measured at the start of the run.

Usage:
    python bench/moe_layer.py [--shapes S1 S2 S3] [--steps 20] [--warmup 3] [--no-compile]
                              [--json $OUT/moe_layer.json]
    python bench/moe_layer.py --cpu-smoke     # tiny shapes on the CPU, for tests
Prints the tables last. Exits 1 if any correctness check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchlib import (  # noqa: E402
    environment,
    fmt,
    module_constants,
    ratio,
    relative_error,
    synchronize,
    time_calls,
)

from upcycle.kernels import gather_gemm  # noqa: E402
from upcycle.kernels import grouped_moe as grouped_moe_kernel  # noqa: E402
from upcycle.model.config import ModelConfig  # noqa: E402
from upcycle.model.mlp import GatedMLP  # noqa: E402
from upcycle.model.moe import MoE  # noqa: E402

TOLERANCE = 1e-2
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    D: int
    F: int
    E: int
    K: int
    T: int
    mirrors: str = ""

    @property
    def flops(self) -> int:
        """Model FLOPs of one forward + backward: 6 · T · K · 3 · D · F (perf.md)."""
        return 6 * self.T * self.K * 3 * self.D * self.F


SHAPES = {
    "S1": Shape("S1", 4096, 14336, 8, 2, 8192, "Llama-3-8B -> 8 experts top-2"),
    "S2": Shape("S2", 2048, 1024, 64, 8, 16384, "1B -> 64 fine-grained experts top-8"),
    "S3": Shape("S3", 2048, 8192, 8, 2, 16384, "1B -> 8 experts top-2"),
}
SMOKE_SHAPES = {
    "tiny": Shape("tiny", 64, 128, 8, 2, 128, "smoke"),
    "tiny-fine": Shape("tiny-fine", 64, 32, 16, 8, 128, "smoke"),
}

# perf.md anchors (TFLOP/s, one H100, 2026-11-24) and targets (fraction of dense_ref).
ANCHORS = {
    "S1": {"dense_ref": 613, "hf eager": 265, "hf grouped_mm": 435},
    "S2": {"dense_ref": 548, "hf eager": 41, "hf grouped_mm": 185},
    "S3": {"dense_ref": 559, "hf eager": 285, "hf grouped_mm": 347},
}
TARGET_LAYER_EFF = {"S1": 0.9, "S2": 0.8, "S3": 0.9}
TARGET_SKEW = 1.15


@dataclass
class Row:
    shape: str
    impl: str
    ms: float | None = None
    ms_spread: tuple[float, float] | None = None
    tflops: float | None = None
    peak_gib: float | None = None
    act_gib: float | None = None
    load_max_over_mean: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    ok: bool | None = None
    compile_s: float | None = None
    note: str = ""


# ----------------------------------------------------------------------------- environment


def free_memory(device: torch.device, collect: bool = False) -> None:
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_ceiling(device: torch.device, n: int, steps: int) -> float:
    """TFLOP/s of one n×n×n bf16 matmul on random data (median of `steps`)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = time_calls(lambda: a @ b, device, warmup=3, steps=steps)
    return 2 * n**3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- the layers


@dataclass
class Weights:
    """One set of MoE parameters, shared by every implementation (bf16 on the device)."""

    router: nn.Parameter  # [E, D]
    w_in: nn.Parameter  # [E, 2F, D]
    w_down: nn.Parameter  # [E, D, F]

    @classmethod
    def random(cls, shape: Shape, device: torch.device, dtype: torch.dtype) -> Weights:
        def normal(*size: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*size, device=device, dtype=dtype).normal_(0.0, 0.02))

        E, D, F_ = shape.E, shape.D, shape.F
        return cls(normal(E, D), normal(E, 2 * F_, D), normal(E, D, F_))

    def parameters(self) -> list[nn.Parameter]:
        return [self.router, self.w_in, self.w_down]


def build_ours(shape: Shape, weights: Weights, implementation: str, device: torch.device) -> MoE:
    """upcycle's MoE on `weights` (no copy), routing as HF's Mixtral block, no aux loss."""
    config = ModelConfig(
        vocab_size=8,
        hidden_size=shape.D,
        intermediate_size=shape.F,
        num_hidden_layers=1,
        num_attention_heads=8,
        moe={
            "num_experts": shape.E,
            "top_k": shape.K,
            "routing": "softmax_topk",
            "renormalize": True,
            "aux_loss_coef": 0.0,
            "implementation": implementation,
        },
    )
    with torch.device("meta"):
        moe = MoE(config)
    moe.gate.weight = weights.router
    moe.experts.gate_up_proj = weights.w_in
    moe.experts.down_proj = weights.w_down
    moe.gate.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
    assert not any(t.is_meta for t in [*moe.parameters(), *moe.buffers()])
    assert moe.resolved_implementation(torch.zeros(1, shape.D, device=device)) == implementation
    return moe.train()


def build_hf(shape: Shape, weights: Weights, experts_implementation: str) -> nn.Module:
    """transformers' MixtralSparseMoeBlock on `weights` (no copy)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        vocab_size=8,
        hidden_size=shape.D,
        intermediate_size=shape.F,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=shape.E,
        num_experts_per_tok=shape.K,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    config._experts_implementation = experts_implementation
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config)
    block.gate.weight = weights.router
    block.experts.gate_up_proj = weights.w_in
    block.experts.down_proj = weights.w_down
    assert not any(t.is_meta for t in [*block.parameters(), *block.buffers()])
    assert block.experts.config._experts_implementation == experts_implementation
    return block.train()


def build_dense(shape: Shape, device: torch.device, dtype: torch.dtype) -> GatedMLP:
    """The dense SwiGLU of width K·F (the same FLOPs as the MoE layer), N(0, 0.02²) weights."""
    with torch.device(device):
        dense = GatedMLP(shape.D, shape.K * shape.F, "silu")
    dense = dense.to(dtype)
    with torch.no_grad():
        for param in dense.parameters():
            param.normal_(0.0, 0.02)
    return dense.train()


# ----------------------------------------------------------------------------- references


def reference_moe(
    x_TD: torch.Tensor,
    router_ED: torch.Tensor,
    w_in_EPD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    top_k: int,
    logit_values_TE: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 MoE: softmax over E, top-K, renormalise, loop over experts (HF Mixtral's function).

    `logit_values_TE` replaces the values of the router logits (not their gradient), so that
    the reference picks the same experts as a router that rounds its logits.
    """
    logits_TE = x_TD @ router_ED.T
    if logit_values_TE is not None:
        logits_TE = logits_TE + (logit_values_TE.to(logits_TE) - logits_TE).detach()
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, indices_TK = torch.topk(probs_TE, top_k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    out_TD = torch.zeros_like(x_TD)
    for expert in range(w_in_EPD.shape[0]):
        token_C, slot_C = torch.where(indices_TK == expert)
        gate_CF, up_CF = (x_TD[token_C] @ w_in_EPD[expert].T).chunk(2, dim=-1)
        y_CD = (F.silu(gate_CF) * up_CF) @ w_down_EDF[expert].T
        out_TD = out_TD.index_add(0, token_C, y_CD * weights_TK[token_C, slot_C, None])
    return out_TD


def reference_dense(x_TD: torch.Tensor, dense: GatedMLP) -> torch.Tensor:
    w_gate, w_up, w_down = (m.weight.float() for m in (dense.gate_proj, dense.up_proj, dense.down_proj))
    return (F.silu(x_TD @ w_gate.T) * (x_TD @ w_up.T)) @ w_down.T


@dataclass
class Reference:
    out: torch.Tensor
    dx: torch.Tensor
    dw: torch.Tensor


def moe_reference(
    x: torch.Tensor, g: torch.Tensor, weights: Weights, top_k: int, logit_values: torch.Tensor | None
) -> Reference:
    x32 = x.detach().float().requires_grad_()
    router32, w_in32, w_down32 = (w.detach().float().requires_grad_() for w in weights.parameters())
    out = reference_moe(x32, router32, w_in32, w_down32, top_k, logit_values)
    out.backward(g.float())
    reference = Reference(out.detach(), x32.grad, w_in32.grad)
    del router32, w_in32, w_down32
    return reference


def check(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    params: list[nn.Parameter],
    reference: Reference,
) -> dict[str, float]:
    """Relative errors of output, dL/dx and dL/d`weight` against `reference`."""
    for param in params:
        param.grad = None
    x = x.detach().requires_grad_()
    out = forward(x)
    out.backward(g)
    errors = {
        "out": relative_error(out.detach(), reference.out),
        "dx": relative_error(x.grad, reference.dx),
        "dw_in": relative_error(weight.grad, reference.dw),
    }
    for param in params:
        param.grad = None
    return errors


def passes(errors: dict[str, float]) -> bool:
    return all(value == value and value <= TOLERANCE for value in errors.values())


# ----------------------------------------------------------------------------- inputs and load


def skewed_inputs(shape: Shape, router: torch.Tensor, generator: torch.Generator, device: torch.device):
    """Random tokens, a fraction of them pushed along router row 0 so expert 0 gets 4× the mean.

    Mean load is T·K/E. A pushed token always picks expert 0, an unpushed one with probability
    about K/E, so a fraction f = 3K/(E − K) (capped at 1) of pushed tokens gives expert 0 about
    T·(f + (1 − f)·K/E) = 4·T·K/E. The push raises logit 0 by 10 (router logits have std ≈ 1.3
    here), and barely moves the others (random router rows are nearly orthogonal).
    """
    T, D, E, K = shape.T, shape.D, shape.E, shape.K
    x = torch.randn(T, D, generator=generator, device=device)
    row0 = router[0].detach().float()
    push = 10.0 / row0.norm() * (row0 / row0.norm())
    fraction = min(1.0, 3 * K / (E - K))
    pushed = torch.randperm(T, generator=generator, device=device)[: round(fraction * T)]
    x[pushed] += push
    return x


def realised_load(moe: MoE, x: torch.Tensor) -> tuple[float, list[int]]:
    """Most loaded expert over the mean, and every expert's assignment count, from our router."""
    with torch.no_grad():
        indices = moe.gate(x).indices_TK
    counts = torch.bincount(indices.reshape(-1), minlength=moe.num_experts).tolist()
    return max(counts) / (sum(counts) / len(counts)), counts


# ----------------------------------------------------------------------------- one shape


@dataclass
class Impl:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    check_weight: torch.Tensor
    reference: str  # which reference: "ours", "hf", "dense", "skew"
    timing_input: str = "x"  # "x" or "skew"
    graphed: bool = False  # timed as replays of one CUDA graph of the whole step


def measure(
    impl: Impl, x: torch.Tensor, g: torch.Tensor, device: torch.device, warmup: int, steps: int
) -> dict[str, object]:
    x = x.detach().requires_grad_()

    def step() -> None:
        for param in impl.params:
            param.grad = None
        x.grad = None
        impl.forward(x).backward(g)

    first = time.perf_counter()
    step()
    synchronize(device)
    first_s = time.perf_counter() - first
    result: dict[str, object] = {"first_step_s": first_s}
    if impl.graphed:
        replay, result["graph_vs_eager"] = capture_step(impl, x, g, device, warmup)
        result["ms_all"] = time_calls(replay, device, warmup=1, steps=steps)
        return result
    times = time_calls(step, device, warmup=max(warmup - 1, 0), steps=steps)
    result["ms_all"] = times
    if device.type == "cuda":
        for param in impl.params:
            param.grad = None
        x.grad = None
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        grads = [t.grad for t in [*impl.params, x] if t.grad is not None]
        grad_bytes = sum(t.numel() * t.element_size() for t in grads)
        result["peak_bytes"] = peak
        result["act_bytes"] = peak - before - grad_bytes
        for param in impl.params:
            param.grad = None
    return result


def kernel_switch(name: str, value: object) -> contextlib.AbstractContextManager[None]:
    """One of `upcycle.kernels.grouped_moe`'s module switches set to `value` for the block, then
    restored. The switches the benches vary are read in forward, which decides for backward."""
    return module_constants(grouped_moe_kernel, {name: value})


def device_side_counts() -> contextlib.AbstractContextManager[None]:
    """The expert path without its host-count route (per-expert weight-gradient GEMMs whose
    sizes are copied to the host during forward): every size stays on the device, as a CUDA graph
    needs; the weight gradients go to torch._grouped_mm, as for layers above the expert limit."""
    return kernel_switch("WGRAD_LOOP_MAX_EXPERTS", 0)


def capture_step(
    impl: Impl, x: torch.Tensor, g: torch.Tensor, device: torch.device, warmup: int
) -> tuple[Callable[[], None], dict[str, float]]:
    """One CUDA graph of a whole step (zeroed gradients, forward, backward) and its replay.

    A graph replays the recorded kernels with no host work between them: the time left is the
    kernels' own. The replay's output and input gradient are checked against an eager step on
    the same inputs (relative errors returned, NaN for a non-finite result; they run the same
    kernels, so they are about 0).
    """
    static_x = x.detach().clone().requires_grad_()
    out: list[torch.Tensor] = []

    def step() -> None:
        for param in impl.params:
            param.grad = None
        static_x.grad = None
        y = impl.forward(static_x)
        y.backward(g)
        out[:] = [y.detach()]

    with device_side_counts():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for _ in range(max(warmup, 2)):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        synchronize(device)
        replayed_out, replayed_dx = out[0].clone(), static_x.grad.clone()
        eager_x = x.detach().clone().requires_grad_()
        eager_out = impl.forward(eager_x)
        eager_out.backward(g)
    errors = {
        "graph_out": relative_error(replayed_out, eager_out.detach()),  # NaN when not finite
        "graph_dx": relative_error(replayed_dx, eager_x.grad),
    }
    for param in impl.params:
        param.grad = None
    return graph.replay, errors


def run_shape(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
    compile_: bool,
    log: Callable[[str], None],
) -> list[Row]:
    seed = {"S1": 1, "S2": 2, "S3": 3}.get(shape.name, 7)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = Weights.random(shape, device, dtype)
    dense = build_dense(shape, device, dtype)
    moe_params = weights.parameters()
    ours = {impl: build_ours(shape, weights, impl, device) for impl in ("eager", "grouped")}
    hf = {impl: build_hf(shape, weights, impl) for impl in ("eager", "grouped_mm")}
    T, D = shape.T, shape.D

    def hf_forward(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: block(x.view(1, T, D)).view(T, D)

    def ours_forward(moe: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: moe(x)[0]

    impls = [
        Impl("dense_ref", dense, list(dense.parameters()), dense.gate_proj.weight, "dense"),
        Impl("hf eager", hf_forward(hf["eager"]), moe_params, weights.w_in, "hf"),
        Impl("hf grouped_mm", hf_forward(hf["grouped_mm"]), moe_params, weights.w_in, "hf"),
        Impl("ours eager", ours_forward(ours["eager"]), moe_params, weights.w_in, "ours"),
        Impl("ours grouped", ours_forward(ours["grouped"]), moe_params, weights.w_in, "ours"),
        Impl("ours grouped skew", ours_forward(ours["grouped"]), moe_params, weights.w_in, "skew", "skew"),
    ]
    if shape.E <= grouped_moe_kernel.WGRAD_LOOP_MAX_EXPERTS:
        # The same layer with the weight gradients left to torch._grouped_mm (the default below
        # the expert limit is one cuBLAS GEMM per expert): the evidence for that choice.
        def all_grouped(x: torch.Tensor, moe: nn.Module = ours["grouped"]) -> torch.Tensor:
            with device_side_counts():
                return moe(x)[0]

        impls.append(Impl("ours grouped, grouped wgrad", all_grouped, moe_params, weights.w_in, "ours"))

    # The dispatched rows gathered again in backward instead of kept from forward
    # (grouped_moe.KEEP_DISPATCHED_ROWS off): the time and memory of that trade, side by side.
    def rows_gathered_again(x: torch.Tensor, moe: nn.Module = ours["grouped"]) -> torch.Tensor:
        with kernel_switch("KEEP_DISPATCHED_ROWS", False):
            return moe(x)[0]

    impls.append(
        Impl("ours grouped, rows gathered again", rows_gathered_again, moe_params, weights.w_in, "ours")
    )

    # The row gathers fused into Triton grouped GEMMs (opt-in, upcycle/kernels/gather_gemm.py):
    # the evidence for turning grouped_moe.GATHER_GEMM on or leaving it off.
    def fused_gathers(x: torch.Tensor, moe: nn.Module = ours["grouped"]) -> torch.Tensor:
        with kernel_switch("GATHER_GEMM", True):  # eager: read in forward, kept on ctx for backward
            return moe(x)[0]

    if device.type == "cuda":
        impls.append(Impl("ours grouped, fused gathers", fused_gathers, moe_params, weights.w_in, "ours"))
    if device.type == "cuda" and grouped_moe_kernel.grouped_mm_available(device, dtype, (shape.D, shape.F)):
        # Whole steps replayed as CUDA graphs, dense and ours alike: the kernels' time without the
        # host's launch gaps (our routing has no host synchronisation, so the step can be captured;
        # only on GPUs with a native torch._grouped_mm, whose fallback copies sizes to the host).
        # For layers of at most WGRAD_LOOP_MAX_EXPERTS experts the graphed weight gradients run on
        # torch._grouped_mm instead of the default per-expert GEMMs (whose sizes come to the host).
        impls.append(
            Impl(
                "dense_ref graphed",
                dense,
                list(dense.parameters()),
                dense.gate_proj.weight,
                "dense",
                graphed=True,
            )
        )
        impls.append(
            Impl(
                "ours grouped graphed",
                ours_forward(ours["grouped"]),
                moe_params,
                weights.w_in,
                "ours",
                graphed=True,
            )
        )
    if compile_:
        compiled = torch.compile(ours["grouped"], dynamic=False)
        impls.append(Impl("ours grouped compiled", ours_forward(compiled), moe_params, weights.w_in, "ours"))

    # Timing inputs (kept) and fresh check inputs (drawn anew, never timed).
    x = torch.randn(T, D, generator=generator, device=device).to(dtype)
    x_skew = skewed_inputs(shape, weights.router, generator, device).to(dtype)
    g = torch.randn(T, D, generator=generator, device=device).to(dtype)
    x_check = torch.randn(T, D, generator=generator, device=device).to(dtype)
    x_check_skew = skewed_inputs(shape, weights.router, generator, device).to(dtype)
    g_check = torch.randn(T, D, generator=generator, device=device).to(dtype)

    load_x, counts_x = realised_load(ours["grouped"], x)
    load_skew, counts_skew = realised_load(ours["grouped"], x_skew)
    log(
        f"[{shape.name}] realised load max/mean: balanced {load_x:.2f} (min {min(counts_x)}, "
        f"max {max(counts_x)}), skewed {load_skew:.2f} (expert counts {counts_skew[:4]}..., "
        f"mean {sum(counts_skew) / len(counts_skew):.0f})"
    )

    # ---- correctness first
    rows = {impl.name: Row(shape.name, impl.name) for impl in impls}
    with torch.no_grad():
        hf_logits = hf["eager"].gate(x_check)[0].float()
    for kind in ("dense", "ours", "hf", "skew"):
        if kind == "dense":
            x32 = x_check.detach().float().requires_grad_()
            dense32 = [m.weight.detach().float().requires_grad_() for m in (dense.gate_proj, dense.up_proj)]
            w_down32 = dense.down_proj.weight.detach().float()
            out32 = (F.silu(x32 @ dense32[0].T) * (x32 @ dense32[1].T)) @ w_down32.T
            out32.backward(g_check.float())
            reference = Reference(out32.detach(), x32.grad, dense32[0].grad)
            del x32, dense32, w_down32, out32
        else:
            reference = moe_reference(
                x_check_skew if kind == "skew" else x_check,
                g_check,
                weights,
                shape.K,
                hf_logits if kind == "hf" else None,
            )
        for impl in impls:
            if impl.reference != kind:
                continue
            row = rows[impl.name]
            check_x = x_check_skew if kind == "skew" else x_check
            try:
                if impl.name.endswith("compiled"):
                    start = time.perf_counter()
                    row.errors = check(
                        impl.forward, check_x, g_check, impl.check_weight, impl.params, reference
                    )
                    synchronize(device)
                    row.compile_s = time.perf_counter() - start
                else:
                    row.errors = check(
                        impl.forward, check_x, g_check, impl.check_weight, impl.params, reference
                    )
                row.ok = passes(row.errors)
            except Exception as error:  # record and go on: one broken implementation must not hide the rest
                row.ok, row.note = False, f"check raised {type(error).__name__}: {error}"[:300]
            errs = " ".join(f"{k}={v:.2e}" for k, v in row.errors.items())
            log(f"[{shape.name}] check {impl.name:<22} {errs} {'ok' if row.ok else 'FAIL'} {row.note}")
        del reference
        free_memory(device)
    del hf_logits

    # ---- timing
    for impl in impls:
        row = rows[impl.name]
        timing_x = x_skew if impl.timing_input == "skew" else x
        row.load_max_over_mean = load_skew if impl.timing_input == "skew" else load_x
        if impl.name == "dense_ref":
            row.load_max_over_mean = None
        try:
            result = measure(impl, timing_x, g, device, warmup, steps)
        except Exception as error:
            row.note = (row.note + f" timing raised {type(error).__name__}: {error}")[:300]
            log(f"[{shape.name}] time  {impl.name:<22} FAILED: {row.note}")
            free_memory(device)
            continue
        if "graph_vs_eager" in result:
            row.errors.update(result["graph_vs_eager"])
            row.ok = row.ok and passes(row.errors)
        times = result["ms_all"]
        row.ms = statistics.median(times)
        row.ms_spread = (min(times), max(times))
        row.tflops = shape.flops / row.ms / 1e9
        if "peak_bytes" in result:
            row.peak_gib = result["peak_bytes"] / GIB
            row.act_gib = result["act_bytes"] / GIB
        log(
            f"[{shape.name}] time  {impl.name:<22} {row.ms:8.3f} ms (min {row.ms_spread[0]:.3f} max "
            f"{row.ms_spread[1]:.3f}) {row.tflops:7.1f} TFLOP/s first step {result['first_step_s']:.2f} s"
        )
        free_memory(device)

    del impls, ours, hf, dense, weights, x, x_skew, g, x_check, x_check_skew, g_check
    free_memory(device, collect=True)
    return list(rows.values())


# ----------------------------------------------------------------------------- report


def by_name(rows: list[Row], shape: str) -> dict[str, Row]:
    return {row.impl: row for row in rows if row.shape == shape}


def results_table(rows: list[Row], ceiling: float | None) -> list[str]:
    lines = [
        "| shape | implementation | ms | TFLOP/s | MFU | layer_eff | × hf eager | × hf grouped_mm "
        "| peak GiB | act GiB | act / dense | load max/mean | rel err out / dx / dW_in | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        named = by_name(rows, row.shape)
        dense_name = "dense_ref graphed" if row.impl.endswith("graphed") else "dense_ref"
        dense, hf_eager, hf_grouped = (named.get(n) for n in (dense_name, "hf eager", "hf grouped_mm"))
        eff = ratio(dense.ms if dense else None, row.ms)
        # graph replays are compared with graph replays only (transformers' rows are not graphed)
        graphed = row.impl.endswith("graphed")
        vs_eager = None if graphed else ratio(hf_eager.ms if hf_eager else None, row.ms)
        vs_grouped = None if graphed else ratio(hf_grouped.ms if hf_grouped else None, row.ms)
        act_vs_dense = ratio(row.act_gib, dense.act_gib if dense else None)
        errs = (
            " / ".join(
                f"{row.errors[k]:.1e}"
                for k in ("out", "dx", "dw_in", "graph_out", "graph_dx")
                if k in row.errors
            )
            or "n/a"
        )
        verdict = "ok" if row.ok else "FAIL"
        if row.compile_s is not None:
            verdict += f" (compile {row.compile_s:.0f} s)"
        if row.note:
            verdict += f" [{row.note[:60]}]"
        lines.append(
            f"| {row.shape} | {row.impl} | {fmt(row.ms, '.2f')} | {fmt(row.tflops, '.0f')} "
            f"| {fmt(ratio(row.tflops, ceiling), '.0%')} | {fmt(eff, '.2f')} | {fmt(vs_eager, '.2f')} "
            f"| {fmt(vs_grouped, '.2f')} | {fmt(row.peak_gib, '.1f')} | {fmt(row.act_gib, '.2f')} "
            f"| {fmt(act_vs_dense, '.2f')} | {fmt(row.load_max_over_mean, '.2f')} | {errs} | {verdict} |"
        )
    return lines


def wgrad_note(shape: str) -> str:
    known = SHAPES.get(shape) or SMOKE_SHAPES.get(shape)
    if known is not None and known.E <= grouped_moe_kernel.WGRAD_LOOP_MAX_EXPERTS:
        return " (weight gradients on torch._grouped_mm)"
    return ""


def targets_table(rows: list[Row]) -> list[str]:
    lines = ["| shape | what | measured | anchor / target | ratio | verdict |", "|---|---|---|---|---|---|"]
    shapes = list(dict.fromkeys(row.shape for row in rows))
    for shape in shapes:
        named = by_name(rows, shape)
        for impl, anchor in ANCHORS.get(shape, {}).items():
            row = named.get(impl)
            measured = row.tflops if row else None
            lines.append(
                f"| {shape} | {impl} TFLOP/s vs perf.md anchor | {fmt(measured, '.0f')} | {anchor} "
                f"| {fmt(ratio(measured, anchor), '.2f')} | ±5% is noise |"
            )
        dense, grouped = named.get("dense_ref"), named.get("ours grouped")
        eff = ratio(dense.ms if dense else None, grouped.ms if grouped else None)
        target = TARGET_LAYER_EFF.get(shape)
        if target is not None:
            verdict = "n/a" if eff is None else ("MET" if eff >= target else "MISSED")
            lines.append(
                f"| {shape} | ours grouped layer_eff | {fmt(eff, '.2f')} | ≥ {target} | "
                f"{fmt(ratio(eff, target), '.2f')} | {verdict} |"
            )
        compiled = named.get("ours grouped compiled")
        if compiled is not None and target is not None:
            c_eff = ratio(dense.ms if dense else None, compiled.ms)
            verdict = "n/a" if c_eff is None else ("MET" if c_eff >= target else "MISSED")
            lines.append(
                f"| {shape} | ours grouped compiled layer_eff | {fmt(c_eff, '.2f')} | ≥ {target} "
                f"| {fmt(ratio(c_eff, target), '.2f')} | {verdict} |"
            )
        graphed, dense_graphed = named.get("ours grouped graphed"), named.get("dense_ref graphed")
        if graphed is not None and dense_graphed is not None and target is not None:
            g_eff = ratio(dense_graphed.ms, graphed.ms)
            verdict = "n/a" if g_eff is None else ("MET" if g_eff >= target else "MISSED")
            lines.append(
                f"| {shape} | ours grouped graphed ÷ dense_ref graphed{wgrad_note(shape)} | {fmt(g_eff, '.2f')} | ≥ {target} "
                f"| {fmt(ratio(g_eff, target), '.2f')} | {verdict} |"
            )
        hf_grouped = named.get("hf grouped_mm")
        speedup = ratio(hf_grouped.ms if hf_grouped else None, grouped.ms if grouped else None)
        lines.append(
            f"| {shape} | ours grouped × hf grouped_mm | {fmt(speedup, '.2f')} | (S2 target ≈ 2.4) | | |"
        )
        skew = named.get("ours grouped skew")
        skew_ratio = ratio(skew.ms if skew else None, grouped.ms if grouped else None)
        verdict = "n/a" if skew_ratio is None else ("MET" if skew_ratio <= TARGET_SKEW else "MISSED")
        load = fmt(skew.load_max_over_mean if skew else None, ".2f")
        lines.append(
            f"| {shape} | t(skew, load {load}× mean) / t(balanced) | {fmt(skew_ratio, '.3f')} "
            f"| ≤ {TARGET_SKEW} | {fmt(ratio(skew_ratio, TARGET_SKEW), '.2f')} | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads)


def run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median taken); ≥ 15")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument(
        "--compile-deadline-s",
        type=float,
        default=150.0,
        help="no compiled row for shapes started this many seconds after the first",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (a test)")
    parser.add_argument(
        "--gather-tiles",
        default=None,
        metavar="BM,BN,BK,WARPS,STAGES",
        help="launch configuration of the gathered GEMMs (the 'fused gathers' row), e.g. the best of bench/gather_gemm.py",
    )
    args = parser.parse_args(argv)
    if args.gather_tiles is not None:
        try:
            gather_gemm.set_tiles(args.gather_tiles)
        except ValueError as error:
            parser.error(str(error))

    def log(line: str) -> None:
        print(line, flush=True)

    if args.cpu_smoke:
        # Tiny ops: one thread avoids OpenMP spinning on a shared 2-core CI machine.
        torch.set_num_threads(1)
        device, shapes, steps, warmup, compile_ = (
            torch.device("cpu"),
            list(SMOKE_SHAPES.values()),
            2,
            1,
            False,
        )
    else:
        if not torch.cuda.is_available():
            print("moe_layer: no CUDA GPU; use --cpu-smoke for the CPU smoke run", file=sys.stderr)
            return 2
        if args.steps < 15:
            parser.error("perf.md asks for the median of at least 15 timed steps")
        device, steps, warmup = torch.device("cuda"), args.steps, args.warmup
        shapes, compile_ = [SHAPES[name] for name in args.shapes], not args.no_compile
    assert not torch.backends.cuda.matmul.allow_tf32, "the fp32 reference must not run in tf32"
    import transformers

    tiles = (*gather_gemm.MM_TILES, gather_gemm.NUM_WARPS, gather_gemm.NUM_STAGES)
    env = environment(device, transformers=transformers.__version__, gather_tiles=",".join(map(str, tiles)))
    log("moe_layer: " + " ".join(f"{k}={v}" for k, v in env.items()))
    ceiling = None
    if device.type == "cuda":
        ceiling = matmul_ceiling(device, 8192, 20)
        log(f"8192^3 bf16 matmul: {ceiling:.0f} TFLOP/s (the MFU ceiling of this run)")

    rows: list[Row] = []
    started = time.perf_counter()
    for shape in shapes:
        shape_start = time.perf_counter()
        log(f"[{shape.name}] D{shape.D} F{shape.F} E{shape.E} K{shape.K} T{shape.T} ({shape.mirrors})")
        compile_shape = compile_ and time.perf_counter() - started < args.compile_deadline_s
        if compile_ and not compile_shape:
            log(f"[{shape.name}] past --compile-deadline-s: no compiled row for this shape")
        rows += run_shape(shape, device, torch.bfloat16, warmup, steps, compile_shape, log)
        log(f"[{shape.name}] done in {time.perf_counter() - shape_start:.1f} s")
        if args.json is not None:  # after every shape, so that a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            payload = {
                "environment": env,
                "matmul_ceiling_tflops": ceiling,
                "steps": steps,
                "warmup": warmup,
                "shapes": {shape.name: asdict(shape) for shape in shapes},
                "rows": [asdict(row) for row in rows],
            }
            args.json.write_text(json.dumps(payload, indent=2))
    log(
        f"all shapes in {time.perf_counter() - started:.1f} s" + (f"; wrote {args.json}" if args.json else "")
    )

    # A compiled row whose compilation raised is reported, not counted as a wrong result.
    failed = [row for row in rows if not row.ok and (row.errors or not row.impl.endswith("compiled"))]
    print()
    print(
        f"MoE layer, bf16 fwd+bwd, {env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}"
    )
    print("\n".join(targets_table(rows)))
    print()
    print("\n".join(results_table(rows, ceiling)))
    if failed:
        print(f"\nFAILED correctness: {', '.join(f'{r.shape} {r.impl}' for r in failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
