"""The fused SwiGLU of the expert path (upcycle/kernels/swiglu.py) and the grouped path's backward.

- torch versions against fp64 autograd, in fp64 (1e-12) and fp32 (1e-6);
- Triton kernels through Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1; skipped
  when Triton is not installed) and, on the GPU machine, compiled for the GPU in bf16;
- the grouped path keeps one [A, 2F] tensor for backward and, with KEEP_DISPATCHED_ROWS, the
  [A, D] dispatched rows (no activation, no expert outputs), measured with saved-tensor hooks;
  under no_grad, or with the rows not kept, they are freed before the second GEMM;
- its gradients against the eager loop for every gradient the layer has, including SwiGLU and a
  non-gated / non-SiLU activation (the autograd recompute branch).
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch
import torch.nn.functional as F
from triton_helpers import run_interpreted

from upcycle.kernels import swiglu
from upcycle.kernels.grouped_moe import grouped_moe
from upcycle.model.moe import eager_experts


def reference(h_A2F: torch.Tensor, d_AF: torch.Tensor, w_A: torch.Tensor):
    """fp64 autograd of out = w · (silu(gate) ⊙ up) · d summed: dh, dw, and a·w."""
    h = h_A2F.double().requires_grad_()
    w = w_A.double().requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up
    (a * w[:, None] * d_AF.double()).sum().backward()
    return a.detach(), h.grad, w.grad, (a * w[:, None]).detach()


def inputs(A: int, F_: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    h = (torch.randn(A, 2 * F_, generator=generator) * 2).to(device, dtype)
    d = torch.randn(A, F_, generator=generator).to(device, dtype)
    w = torch.rand(A, generator=generator).to(device, dtype)
    return h, d, w


def close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize(("A", "F_"), [(7, 5), (33, 64), (4, 1100)])
def test_torch_versions_match_fp64_autograd(dtype, tolerance, A, F_) -> None:
    h, d, w = inputs(A, F_, dtype, seed=A + F_)
    a_ref, dh_ref, dw_ref, aw_ref = reference(h, d, w)
    assert close(swiglu.swiglu_forward_torch(h), a_ref) < tolerance
    dh, dw, aw = swiglu.swiglu_backward_torch(h, d, w)
    assert dh.dtype == dtype and aw.dtype == dtype
    for actual, expected in ((dh, dh_ref), (dw, dw_ref), (aw, aw_ref)):
        assert close(actual, expected) < tolerance


INTERPRETED = textwrap.dedent(
    """
    import torch
    from upcycle.kernels import combine, swiglu
    from tests.test_swiglu import close, inputs, reference

    for A, F_ in ((5, 3), (9, 1100), (0, 8)):
        h, d, w = inputs(A, F_, torch.float32, seed=A)
        a = swiglu.swiglu_forward_triton(h)
        dh, dw, aw = swiglu.swiglu_backward_triton(h, d, w)
        assert a.shape == (A, F_) and dh.shape == (A, 2 * F_) and dw.shape == (A,)
        if A:
            a_ref, dh_ref, dw_ref, aw_ref = reference(h, d, w)
            errors = [close(x, y) for x, y in ((a, a_ref), (dh, dh_ref), (dw, dw_ref), (aw, aw_ref))]
            assert max(errors) < 1e-6, errors
        # strided input rows (a column slice), as a view of a wider tensor would be
        wide = torch.cat([h, torch.zeros(A, 3)], dim=1)[:, : 2 * F_]
        assert torch.equal(swiglu.swiglu_forward_triton(wide), a)
        # in place: dh over h, a·w over d, the same values
        h2, d2 = h.clone(), d.clone()
        dh2, dw2, aw2 = swiglu.swiglu_backward_triton(h2, d2, w, in_place=True)
        assert dh2.data_ptr() == h2.data_ptr() and aw2.data_ptr() == d2.data_ptr()
        assert torch.equal(dh2, dh) and torch.equal(dw2, dw) and torch.equal(aw2, aw)
    for T, K, D in ((6, 2, 5), (4, 8, 1030), (0, 2, 4)):
        generator = torch.Generator().manual_seed(T + K)
        src = torch.randn(T * K, D, generator=generator)
        index = torch.randperm(T * K, generator=generator)
        weights = torch.rand(T, K, generator=generator)
        for w in (weights, None):
            expected = src.double()[index].view(T, K, D)
            expected = (expected * (1 if w is None else w.double()[..., None])).sum(1)
            for got in (combine.gather_sum_triton(src, index, w, K), combine.gather_sum_torch(src, index, w, K)):
                assert got.shape == (T, D) and close(got, expected) < 1e-6 if T else got.shape == (0, D)
    # the MoA gate's row scaling: forward and the one-pass backward against autograd in fp64
    generator = torch.Generator().manual_seed(11)
    for R, W in ((37, 16), (5, 128), (0, 8)):
        x = torch.randn(R, W, generator=generator, requires_grad=True)
        s = torch.rand(R, generator=generator, requires_grad=True)
        dy = torch.randn(R, W, generator=generator)
        y = combine._ScaleRows.apply(x, s)
        y.backward(dy)
        x64, s64 = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
        (x64 * s64[:, None]).backward(dy.double())
        assert torch.equal(y.detach(), x.detach() * s.detach()[:, None])
        if R:
            assert close(x.grad, x64.grad) < 1e-6 and close(s.grad, s64.grad) < 1e-6
    print("interpreted ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_in_the_interpreter_match_fp64() -> None:
    assert "interpreted ok" in run_interpreted(INTERPRETED, timeout=300)


def routed(T: int, E: int, K: int, D: int, F_: int, dtype: torch.dtype, seed: int, gated: bool = True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=generator).to(dtype)
    logits = torch.randn(T, E, generator=generator)
    probs, indices = logits.softmax(-1).topk(K, dim=-1)
    weights = probs.to(dtype)
    w_in = (torch.randn(E, (2 if gated else 1) * F_, D, generator=generator) / D**0.5).to(dtype)
    w_down = (torch.randn(E, D, F_, generator=generator) / F_**0.5).to(dtype)
    return x, weights, indices, w_in, w_down


def gradients(run, x, weights, indices, w_in, w_down, activation, gated, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w_in, w_down)]
    out = run(leaves[0], leaves[1], indices, leaves[2], leaves[3], activation, gated)
    out.backward(g)
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_bf16_on_gpu_matches_the_fp32_loop(run, experts: int, seed: int) -> None:
    """`run` (a grouped path) in bf16 on the GPU against the fp32 eager loop, 2048 tokens top-4,
    D 256, F 512: output and the four gradients within 1e-2 (relative norm)."""
    x, weights, indices, w_in, w_down = routed(2048, experts, 4, 256, 512, torch.float32, seed=seed)
    g = torch.randn(2048, 256, generator=torch.Generator().manual_seed(seed + 1))
    cuda = [t.cuda() for t in (x, weights, indices, w_in, w_down, g)]
    bf16 = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in cuda]
    out, grads = gradients(run, *bf16[:5], F.silu, True, bf16[5])
    out_ref, grads_ref = gradients(eager_experts, *cuda[:5], F.silu, True, cuda[5])
    assert close(out.float(), out_ref.double()) < 1e-2
    for name, grad, grad_ref in zip(("x", "weights", "w_in", "w_down"), grads, grads_ref, strict=True):
        assert close(grad.float(), grad_ref.double()) < 1e-2, name


@pytest.mark.parametrize(
    ("activation", "gated"), [(F.silu, True), (F.gelu, True), (F.relu, False), (F.silu, False)]
)
def test_grouped_backward_matches_the_eager_loop_in_fp64(activation, gated) -> None:
    # 12 experts for 10 tokens × 2: some experts get no token (their gradients must be zero).
    x, weights, indices, w_in, w_down = routed(10, 12, 2, 8, 6, torch.float64, seed=3, gated=gated)
    g = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out, grads = gradients(grouped_moe, x, weights, indices, w_in, w_down, activation, gated, g)
    out_ref, grads_ref = gradients(eager_experts, x, weights, indices, w_in, w_down, activation, gated, g)
    assert torch.allclose(out, out_ref, rtol=0, atol=1e-12)
    for name, grad, grad_ref in zip(("x", "weights", "w_in", "w_down"), grads, grads_ref, strict=True):
        assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-12), name
    unused = sorted(set(range(12)) - set(indices.flatten().tolist()))
    assert unused and grads[2][unused].abs().max() == 0 and grads[3][unused].abs().max() == 0


@pytest.mark.parametrize(("dtype", "E"), [(torch.float64, 4), (torch.float32, 32), (torch.bfloat16, 32)])
def test_grouped_path_with_no_tokens(dtype, E) -> None:
    """An expert-parallel rank can receive no assignment at all: zeros, not an error (fp64: the
    segment loop; fp32 / bf16 with widths of 16 bytes: torch._grouped_mm)."""
    x, weights, indices, w_in, w_down = routed(0, E, 1, 16, 8, dtype, seed=8)
    g = torch.zeros(0, 16, dtype=dtype)
    out, grads = gradients(grouped_moe, x, weights, indices, w_in, w_down, F.silu, True, g)
    assert out.shape == (0, 16) and grads[0].shape == (0, 16)
    assert grads[2].shape == w_in.shape and grads[2].abs().max() == 0 and grads[3].abs().max() == 0


def test_second_order_gradients_are_refused_not_silently_wrong() -> None:
    x, weights, indices, w_in, w_down = routed(6, 4, 2, 8, 6, torch.float64, seed=10)
    x.requires_grad_()
    out = grouped_moe(x, weights, indices, w_in, w_down, F.silu, True)
    (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()


@pytest.mark.parametrize("keep", [True, False], ids=["rows-kept", "rows-gathered-again"])
@pytest.mark.parametrize("frozen_experts", [False, True], ids=["training", "frozen-experts"])
def test_grouped_path_saves_what_its_memory_budget_says(keep, frozen_experts, monkeypatch) -> None:
    """Activation memory: autograd keeps x_TD, h_A2F and routing vectors, plus the [A, D]
    dispatched rows only with KEEP_DISPATCHED_ROWS and expert weights that get gradients; and
    the backward pass gathers the token rows once (the output gradient's) when they are kept,
    twice otherwise."""
    import upcycle.kernels.grouped_moe as grouped

    monkeypatch.setattr(grouped, "KEEP_DISPATCHED_ROWS", keep)
    T, E, K, D, F_ = 64, 8, 4, 32, 16
    x, weights, indices, w_in, w_down = routed(T, E, K, D, F_, torch.float32, seed=5)
    leaves = [t.detach().clone().requires_grad_(not frozen_experts or i < 2) for i, t in
              enumerate((x, weights, w_in, w_down))]  # fmt: skip
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = grouped_moe(leaves[0], leaves[1], indices, leaves[2], leaves[3], F.silu, True)
    A = T * K
    # The weights are saved too, but they are parameters, not activations.
    parameters = {leaf.data_ptr() for leaf in leaves[2:]}
    activations = {
        t.data_ptr(): t
        for t in saved
        if t.is_floating_point() and t.numel() >= T * D and t.data_ptr() not in parameters
    }
    kept = keep and not frozen_experts
    sizes = sorted(t.numel() for t in activations.values())
    assert sizes == sorted([T * D, A * 2 * F_] + [A * D] * kept), sizes
    gathers = []
    index_select = torch.Tensor.index_select

    def counting(self, dim, index):
        if tuple(self.shape) == (T, D) and index.numel() == A:  # token rows into expert order
            gathers.append(self.shape)
        return index_select(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", counting)
    out.sum().backward()
    assert len(gathers) == (1 if kept or frozen_experts else 2)  # g_AD, and x_AD unless kept
    assert all(leaf.grad is not None for leaf in leaves if leaf.requires_grad)
    monkeypatch.undo()
    expected = gradients(eager_experts, x, weights, indices, w_in, w_down, F.silu, True, torch.ones(T, D))[1]
    for leaf, grad in zip(leaves, expected, strict=True):
        if leaf.requires_grad:
            assert close(leaf.grad, grad) < 1e-5


@pytest.mark.parametrize(
    ("case", "kept"),
    [
        ("training", True),
        ("no_grad", False),
        ("inference_mode", False),
        ("keep-off", False),
        ("frozen-experts", False),
    ],
)
def test_forward_frees_the_dispatched_rows_unless_backward_keeps_them(case, kept, monkeypatch) -> None:
    """The gathered rows x_AD live past the first GEMM only when they are kept for backward:
    not under no_grad / inference_mode, with KEEP_DISPATCHED_ROWS off, or with frozen experts."""
    import contextlib
    import weakref

    import upcycle.kernels.grouped_moe as grouped

    monkeypatch.setattr(grouped, "KEEP_DISPATCHED_ROWS", case != "keep-off")
    T, E, K, D, F_ = 32, 4, 2, 16, 8
    x, weights, indices, w_in, w_down = routed(T, E, K, D, F_, torch.float32, seed=31)
    leaves = [t.clone().requires_grad_(case != "frozen-experts" or i < 2) for i, t in
              enumerate((x, weights, w_in, w_down))]  # fmt: skip
    first_inputs, alive_at_second = [], []
    linear = grouped.grouped_linear

    def recording_linear(x_AI, w_EOI, offsets_E, split_sizes):
        if x_AI.shape == (T * K, D) and not first_inputs:  # the first GEMM's gathered rows
            first_inputs.append(weakref.ref(x_AI))
        elif x_AI.shape == (T * K, F_) and first_inputs and not alive_at_second:  # the second GEMM
            alive_at_second.append(first_inputs[0]() is not None)
        return linear(x_AI, w_EOI, offsets_E, split_sizes)

    monkeypatch.setattr(grouped, "grouped_linear", recording_linear)
    mode = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        case, contextlib.nullcontext
    )
    with mode():
        out = grouped_moe(leaves[0], leaves[1], indices, leaves[2], leaves[3], F.silu, True)
    assert alive_at_second == [kept]
    if out.requires_grad:
        out.sum().backward()


def test_in_place_backward_frees_h_before_the_dx_combine(monkeypatch) -> None:
    """With the in-place SwiGLU backward (CUDA), dh is written over h and must be freed right
    after the dx GEMM, before the dx gather-sum, and the kept dispatched rows too: nothing outside
    experts_backward may still hold h or the rows. Emulated on the CPU: the torch SwiGLU backward, its results copied over h and d."""
    import weakref

    import upcycle.kernels.grouped_moe as grouped

    def backward_in_place(h, d, w, in_place=False):
        dh, dw, aw = swiglu.swiglu_backward_torch(h, d, w)
        assert in_place
        return h.copy_(dh), dw, d.copy_(aw)

    monkeypatch.setattr(swiglu, "use_triton", lambda h: True)
    monkeypatch.setattr(swiglu, "swiglu_forward", swiglu.swiglu_forward_torch)
    monkeypatch.setattr(swiglu, "swiglu_backward", backward_in_place)
    h_refs, alive_at_dx_combine = [], []
    forward = grouped.experts_forward

    def recording_forward(*args):
        out, h, rows = forward(*args)
        h_refs.append(weakref.ref(h))
        assert rows is not None  # KEEP_DISPATCHED_ROWS: the rows are kept, and held on ctx
        h_refs.append(weakref.ref(rows))
        return out, h, rows

    combine = grouped.gather_sum

    def recording_combine(src, index, weights, K):
        if weights is None:  # the backward's dx un-permute
            alive_at_dx_combine.append(any(ref() is not None for ref in h_refs))
        return combine(src, index, weights, K)

    monkeypatch.setattr(grouped, "experts_forward", recording_forward)
    monkeypatch.setattr(grouped, "gather_sum", recording_combine)
    data = routed(32, 4, 2, 16, 8, torch.float32, seed=21)
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(22))
    out, grads = gradients(grouped_moe, *data, F.silu, True, g)
    assert alive_at_dx_combine == [False]
    out_ref, grads_ref = gradients(eager_experts, *data, F.silu, True, g)
    assert close(out, out_ref) < 1e-6
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert close(grad, grad_ref) < 1e-6


def test_saved_tensor_hooks_are_seen_inside_activation_checkpointing() -> None:
    """Under checkpointing the grouped path must save h normally (not hold it on ctx)."""
    from torch.utils.checkpoint import checkpoint

    from upcycle.kernels.grouped_moe import saved_tensor_hooks_active

    seen = []

    def block(x):
        seen.append(saved_tensor_hooks_active())
        return x * 2

    assert not saved_tensor_hooks_active()
    x = torch.ones(3, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert seen and all(seen)  # the forward and its recomputation
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert saved_tensor_hooks_active()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_gpu_match_fp64() -> None:
    for A, F_ in ((4096, 1024), (513, 14336), (0, 64)):
        h, d, w = inputs(A, F_, torch.bfloat16, seed=A, device="cuda")
        assert swiglu.use_triton(h)
        a = swiglu.swiglu_forward_triton(h)
        dh, dw, aw = swiglu.swiglu_backward_triton(h, d, w)
        if A:
            a_ref, dh_ref, dw_ref, aw_ref = (t.cpu() for t in reference(h, d, w))
            for actual, expected in ((a, a_ref), (dh, dh_ref), (dw, dw_ref), (aw, aw_ref)):
                assert close(actual.cpu(), expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scale_rows_on_gpu_matches_fp64() -> None:
    from upcycle.kernels.combine import scale_rows

    generator = torch.Generator().manual_seed(12)
    x = torch.randn(8192, 128, generator=generator)
    s = torch.rand(8192, generator=generator)
    dy = torch.randn(8192, 128, generator=generator)
    x16, s16 = (t.cuda().to(torch.bfloat16).requires_grad_() for t in (x, s))
    y = scale_rows(x16, s16)
    assert y.grad_fn is not None and "ScaleRows" in type(y.grad_fn).__name__
    y.backward(dy.cuda().to(torch.bfloat16))
    x64, s64 = x16.detach().double().cpu().requires_grad_(), s16.detach().double().cpu().requires_grad_()
    (x64 * s64[:, None]).backward(dy.cuda().to(torch.bfloat16).double().cpu())
    assert close(y.detach().float().cpu(), (x64 * s64[:, None]).detach()) < 1e-2
    assert close(x16.grad.float().cpu(), x64.grad) < 1e-2 and close(s16.grad.float().cpu(), s64.grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_second_backward_through_the_in_place_path_is_refused_clearly() -> None:
    x, weights, indices, w_in, w_down = (
        t.cuda().to(torch.bfloat16) if t.is_floating_point() else t.cuda()
        for t in routed(256, 8, 2, 64, 128, torch.float32, seed=9)
    )
    x.requires_grad_()
    out = grouped_moe(x, weights, indices, w_in, w_down, F.silu, True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(
        RuntimeError, match=r"retain_graph=True or double backward set moe\.implementation: eager"
    ):
        out.sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_bf16_gradients_on_gpu_match_the_fp32_eager_loop() -> None:
    assert_bf16_on_gpu_matches_the_fp32_loop(grouped_moe, experts=16, seed=6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("experts", [8, 64], ids=["wgrad-loop-in-eager", "grouped-wgrad"])
def test_compiled_grouped_path_on_gpu_matches_the_fp32_eager_loop(experts: int) -> None:
    """Compiled, the SwiGLU expert path is the custom operator of upcycle.kernels.moe_ops (Triton
    glue inside a compiled graph): its bf16 gradients against the fp32 eager loop."""
    import torch._dynamo

    torch._dynamo.reset()
    assert_bf16_on_gpu_matches_the_fp32_loop(torch.compile(grouped_moe, fullgraph=True), experts, seed=16)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_run_on_the_device_of_their_tensors_not_the_current_one() -> None:
    """A model on cuda:1 while cuda:0 is current: Triton launches and the host-count event must
    follow the tensors (gradients equal to the same computation on cuda:0)."""
    data = routed(512, 8, 2, 64, 128, torch.float32, seed=13)
    g = torch.randn(512, 64, generator=torch.Generator().manual_seed(14))
    results = []
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        moved = [t.to(device).to(torch.bfloat16) if t.is_floating_point() else t.to(device) for t in data]
        out, grads = gradients(grouped_moe, *moved, F.silu, True, g.to(device).to(torch.bfloat16))
        results.append([out.cpu(), *(grad.cpu() for grad in grads)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_per_expert_weight_gradients_match_fp64_with_an_empty_expert() -> None:
    """`grouped_weight_grad` with host row counts (one GEMM per expert, written into its slot):
    each expert's Σ g_aᵀ x_a over its own rows, zeros for an expert without rows."""
    g = torch.Generator().manual_seed(21)
    sizes = [3, 0, 5, 2]
    g_AO, x_AI = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g)
    from upcycle.kernels.grouped_moe import grouped_weight_grad

    got = grouped_weight_grad(g_AO, x_AI, None, sizes, len(sizes))
    start, expected = 0, []
    for rows in sizes:
        expected.append(g_AO[start : start + rows].double().t() @ x_AI[start : start + rows].double())
        start += rows
    torch.testing.assert_close(got.double(), torch.stack(expected), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], torch.zeros(6, 4))
