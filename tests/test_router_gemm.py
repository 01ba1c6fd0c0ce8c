"""The fp32 router logits from bf16 GEMMs (upcycle/kernels/router_gemm.py) against fp64.

On the CPU the bf16 GEMMs are emulated by fp32 GEMMs of the upcast operands, which give the same
numbers (products of bf16 values are exact in fp32, the sums are fp32), so these tests check the
splitting and the stacking, which is where an error would be.
"""

from __future__ import annotations

import pytest
import torch
from triton_helpers import run_interpreted

from upcycle.kernels import router_gemm
from upcycle.model.router import Router

needs_triton = pytest.mark.skipif(not router_gemm.triton_installed(), reason="Triton is not installed")

T, D, E = 96, 320, 12


def _inputs(weight_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen).to(torch.bfloat16)
    # weights over several binades, as trained routers have
    w = (torch.randn(E, D, generator=gen) * torch.exp(torch.randn(E, D, generator=gen))).to(weight_dtype)
    g = torch.randn(T, E, generator=gen) * torch.exp(torch.randn(T, E, generator=gen))
    return x, w, g


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref).norm() / ref.norm())


def test_three_bf16_parts_sum_to_the_fp32_value_exactly():
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(4096, generator=gen) * torch.exp(4 * torch.randn(4096, generator=gen))
    parts = router_gemm.split_bf16(t, 3)
    assert all(p.dtype == torch.bfloat16 for p in parts)
    assert torch.equal(sum(p.double() for p in parts), t.double())
    two = router_gemm.split_bf16(t, 2)
    assert not torch.equal(sum(p.double() for p in two), t.double())  # two parts are not enough


def test_split_keeps_infinities_nans_and_values_above_the_bf16_range():
    big = torch.finfo(torch.float32).max
    t = torch.tensor([big, -big, 3.3895e38, 3.4e38, float("inf"), -float("inf"), float("nan"), -0.0, 1.5])
    parts = router_gemm.split_bf16(t, 3)
    total = parts[0].double() + parts[1].double() + parts[2].double()
    assert torch.equal(total[:4], t[:4].double())  # the largest fp32 values, exactly
    assert torch.equal(total[4:6], t[4:6].double()) and torch.isnan(total[6])
    assert torch.equal(total[7:], t[7:].double())
    w = torch.tensor([[3.4e38, 1.0], [float("inf"), 1.0]])
    x = torch.tensor([[1.0, 0.0]], dtype=torch.bfloat16)
    logits = router_gemm.router_logits(x, w)
    assert logits[0, 0] == x.float()[0, 0] * w[0, 0] and logits[0, 1] == float("inf")


def test_applies_only_to_bf16_inputs_on_a_gpu():
    x, w, _ = _inputs(torch.float32)
    assert not router_gemm.applies(x, w)  # a CPU tensor
    assert not router_gemm.applies(x.float(), w)


def test_input_gradient_where_the_router_rows_share_a_component():
    """A softmax gradient sums to zero over experts, so a component every router row shares
    cancels in g W: the input gradient must stay as accurate as the upcast path's there too."""
    gen = torch.Generator().manual_seed(5)
    shared = torch.randn(1, D, generator=gen)
    for spread in (1.0, 2**-10, 2**-12):
        w = shared + spread * torch.randn(E, D, generator=gen)
        x = torch.randn(T, D, generator=gen).to(torch.bfloat16).requires_grad_()
        logits = router_gemm.router_logits(x, w)
        g = torch.softmax(logits.detach(), -1) - torch.rand(T, E, generator=gen).softmax(-1)
        logits.backward(g)
        dx_ref = g.double() @ w.double()
        upcast = (g @ w).to(torch.bfloat16)
        assert _rel(x.grad, dx_ref) <= 1.01 * _rel(upcast, dx_ref), spread


def test_double_backward_runs_the_plain_products():
    x, w, g = _inputs(torch.float32)
    x_ = x.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    logits = router_gemm.router_logits(x_, w_)
    (dw,) = torch.autograd.grad(logits, w_, g, create_graph=True)
    (dw.square().sum()).backward()
    # d/dx Σ (g^T x)^2 = 2 g (g^T x): the second-order gradient through the plain products
    expected = 2 * g.double() @ (g.double().T @ x.double())
    assert _rel(x_.grad, expected) <= 2**-7


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_logits_and_gradients_at_fp32_accuracy(weight_dtype):
    x, w, g = _inputs(weight_dtype)
    x64, w64, g64 = x.double(), w.double(), g.double()
    ref = x64 @ w64.T
    fp32 = x.float() @ w.float().T  # what the upcast path computes
    x_ = x.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    logits = router_gemm.router_logits(x_, w_)
    assert logits.dtype == torch.float32 and logits.shape == (T, E)
    # fp32 accuracy: an exact product per term, fp32 sums (two bf16 parts would be ~1e-5 off)
    assert _rel(logits, ref) <= max(2 * _rel(fp32, ref), 1e-7)
    logits.backward(g)
    assert w_.grad.dtype == weight_dtype and x_.grad.dtype == torch.bfloat16
    dw_ref, dx_ref = g64.T @ x64, g64 @ w64
    if weight_dtype == torch.float32:
        assert _rel(w_.grad, dw_ref) <= max(2 * _rel(g.T @ x.float(), dw_ref), 1e-7)
    else:  # one rounding to bf16 of an fp32-accurate gradient
        assert torch.equal(w_.grad, dw_ref.to(torch.bfloat16)) or _rel(w_.grad, dw_ref) <= 2**-9
    # dx: accurate to 2^-16 of the terms' size before its one rounding to bf16, so within half a
    # bf16 step of fp64's (plus that term error, for sums that cancel)
    half_step = 0.5 * torch.finfo(torch.bfloat16).eps * dx_ref.abs()
    terms = g64.abs() @ w64.abs()
    assert ((x_.grad.double() - dx_ref).abs() <= half_step + 2**-15 * terms).all()
    # and no looser than the upcast path's fp32 gradient rounded to bf16
    upcast = (g @ w.float()).to(torch.bfloat16)
    assert _rel(x_.grad, dx_ref) <= 1.01 * _rel(upcast, dx_ref)


def test_gradients_only_where_needed_and_no_tokens():
    x, w, g = _inputs(torch.float32)
    w_ = w.clone().requires_grad_()
    router_gemm.router_logits(x, w_).backward(g)
    assert w_.grad.shape == w.shape
    empty = router_gemm.router_logits(x[:0], w)
    assert empty.shape == (0, E)
    dx, dw = router_gemm.router_logits_backward(
        g[:0], x[:0], torch.cat(router_gemm.split_bf16(w, 3)), w, True, True
    )
    assert dx.shape == (0, D) and torch.equal(dw, torch.zeros_like(w))


def test_opcheck():
    x, w, _ = _inputs(torch.float32)
    torch.library.opcheck(router_gemm.router_logits_op, (x, w.requires_grad_()))
    torch.library.opcheck(router_gemm.router_logits_op, (x.requires_grad_(), w.to(torch.bfloat16)))


def test_router_takes_the_bf16_path_where_it_applies(monkeypatch):
    x, w, g = _inputs(torch.float32)
    router = Router(D, E, "softmax_topk", 2)
    with torch.no_grad():
        router.weight.copy_(w)
    x3 = x.view(4, T // 4, D).clone().requires_grad_()
    plain = router.logits(x3)
    monkeypatch.setattr(router_gemm, "applies", lambda x_TD, weight_ED: True)
    calls = []
    op = router_gemm.router_logits
    monkeypatch.setattr(router_gemm, "router_logits", lambda *args: calls.append(args) or op(*args))
    fast = router.logits(x3)
    assert len(calls) == 1 and calls[0][0].shape == (T, D)
    assert fast.shape == plain.shape == (4, T // 4, E) and fast.dtype == torch.float32
    ref = x3.detach().double() @ w.double().T
    assert _rel(fast, ref) <= max(2 * _rel(plain, ref), 1e-7)
    fast.backward(g.view(4, T // 4, E))
    fast_dx, fast_dw = x3.grad.clone(), router.weight.grad.clone()
    x3.grad, router.weight.grad = None, None
    plain.backward(g.view(4, T // 4, E))
    dw_ref = g.double().T @ x.double()
    assert _rel(fast_dw, dw_ref) <= max(2 * _rel(router.weight.grad, dw_ref), 1e-7)
    dx_ref = g.double() @ w.double()
    assert _rel(fast_dx.view(T, D), dx_ref) <= 1.01 * _rel(x3.grad.view(T, D), dx_ref)


def test_compiled_router_logits_equal_eager(monkeypatch):
    monkeypatch.setattr(router_gemm, "applies", lambda x_TD, weight_ED: True)
    x, w, g = _inputs(torch.float32)
    router = Router(D, E, "softmax_topk", 2)
    with torch.no_grad():
        router.weight.copy_(w)
    compiled = torch.compile(router.logits, fullgraph=True, dynamic=False)
    eager_out = router.logits(x)
    out = compiled(x)
    assert torch.equal(out, eager_out)
    out.backward(g)
    compiled_dw = router.weight.grad.clone()
    router.weight.grad = None
    eager_out.backward(g)
    assert torch.equal(compiled_dw, router.weight.grad)


FP32_KERNELS = """
import torch
from upcycle.kernels import router_gemm as rg

def rel(a, ref):
    return float((a.detach().double() - ref).norm() / ref.norm())

gen = torch.Generator().manual_seed(0)
for T, D, E, wide in ((96, 320, 12, False), (1100, 70, 16, True), (5, 64, 1, False)):
    for weight_dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(T, D + 9 * wide, generator=gen).to(torch.bfloat16)[:, :D]  # strided rows too
        w = (torch.randn(E, D, generator=gen) * torch.exp(torch.randn(E, D, generator=gen))).to(weight_dtype)
        g = torch.randn(T, E, generator=gen) * torch.exp(torch.randn(T, E, generator=gen))
        assert rg.fp32_kernels(x, w)
        logits, stacked = rg.router_logits_op(x, w)
        assert stacked.shape == (0, D) and logits.dtype == torch.float32 and logits.shape == (T, E)
        x64, w64, g64 = x.double(), w.double(), g.double()
        ref = x64 @ w64.T
        # any fp32 sum of D exact-ish products: within D·2^-24 of Σ|x||w| (and 1e-6 overall)
        assert ((logits.double() - ref).abs() <= D * 2**-24 * (x64.abs() @ w64.abs().T)).all()
        assert rel(logits, ref) <= 1e-6, (T, D, E)
        dx, dw = rg.router_logits_backward(g, x, stacked, w, True, True)
        assert dx.dtype == torch.bfloat16 and dw.dtype == weight_dtype
        dw_ref, dx_ref = g64.T @ x64, g64 @ w64
        if weight_dtype == torch.float32:
            assert ((dw.double() - dw_ref).abs() <= T * 2**-24 * (g64.abs().T @ x64.abs())).all()
            assert rel(dw, dw_ref) <= 1e-6, (T, D, E)
        # one rounding (truncation, in the interpreter) of an fp32-accurate value: within a unit
        unit = torch.finfo(torch.bfloat16).eps
        assert ((dw.double() - dw_ref).abs() <= unit * dw_ref.abs() + 1e-6 * (g64.abs().T @ x64.abs())).all()
        assert ((dx.double() - dx_ref).abs() <= unit * dx_ref.abs() + 1e-6 * (g64.abs() @ w64.abs())).all()
        none_dx, only_dw = rg.router_logits_backward(g, x, stacked, w, False, True)
        assert none_dx.numel() == 0 and torch.equal(only_dw, dw)
torch.library.opcheck(rg.router_logits_op, (x.clone().requires_grad_(), w.clone().requires_grad_()))
assert not rg.fp32_kernels(x, torch.zeros(rg.FP32_KERNEL_MAX_EXPERTS + 1, 64))  # wider: the bf16 parts
# compiled (the fake shapes of the kernels' path, [0, D] parts), forward and backward as eager
torch._dynamo.reset()
xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
compiled = torch.compile(rg.router_logits, fullgraph=True, dynamic=False)(xc, wc)
compiled.backward(g)
xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
eager = rg.router_logits(xe, we)
eager.backward(g)
assert torch.equal(compiled, eager) and torch.equal(xc.grad, xe.grad) and torch.equal(wc.grad, we.grad)
empty, stacked = rg.router_logits_op(x[:0], w)
assert empty.shape == (0, 1)
dx, dw = rg.router_logits_backward(g[:0], x[:0], stacked, w, True, True)
assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros_like(w))
# a chunk that is not a power of two: tiles must not reach into the next chunk (which sums them too)
rg._CHUNK, T, D, E = 192, 400, 64, 8
x = torch.randn(T, D, generator=gen).to(torch.bfloat16)
g = torch.randn(T, E, generator=gen)
dw = rg._dw_fp32(g, x, torch.float32).double()
dw_ref = g.double().T @ x.double()
assert ((dw - dw_ref).abs() <= T * 2**-24 * (g.double().abs().T @ x.double().abs())).all()
print("ok")
"""


@needs_triton
def test_fp32_kernels_in_the_interpreter():
    """Routers of up to 16 experts: the three fp32 Triton kernels (logits, dx, dW) against fp64,
    within fp32's summation bound and 1e-6 overall, for partial blocks of tokens, widths and experts, several dW
    chunks, strided rows, fp32 and bf16 weights, one expert and no tokens."""
    assert run_interpreted(FP32_KERNELS).strip().endswith("ok")


@needs_triton
def test_router_kernels_bench_smoke() -> None:
    """bench/router_kernels.py in the interpreter: the module's launch shapes and the variants
    agree with fp64 within their bounds, and a table comes out."""
    out = run_interpreted(
        "import sys\nsys.path.insert(0, 'bench')\nfrom benchlib import load_script\n"
        "assert load_script('router_kernels').main(['--cpu-smoke']) == 0\n"
    )
    rows = [
        line.split(" | ")
        for line in out.splitlines()
        if line.startswith(("| logits", "| dx", "| dw", "| router"))
    ]
    assert [r[0] for r in rows] == [
        "| logits (module's)",
        "| dx (module's)",
        "| dw (module's)",
        "| logits (logits_tile 2048, logits_block_d 64)",
        "| dx (dx_block_t 8, dx_block_d 64)",
        "| dw (chunk 64)",
        "| router fwd+bwd, fp32 kernels",
        "| router fwd+bwd, upcast fp32 GEMM",
    ]
    assert all(r[-1] == "ok |" for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_gpu_fp32_kernels_at_fp32_gemm_accuracy(weight_dtype):
    """The fp32 Triton kernels (up to 16 experts) at the Mixtral bench's router shape (16384
    tokens, D 1024, 8 experts) and at 16 experts: within fp32's summation bound of fp64 and 1e-6
    overall (the bf16-part GEMMs: 2.1e-6, an fp32 SGEMM 2-6e-7), and deterministic."""
    for T, D, E in ((16384, 1024, 8), (4096, 2048, 16)):
        gen = torch.Generator(device="cuda").manual_seed(3)
        x = torch.randn(T, D, device="cuda", generator=gen).to(torch.bfloat16)
        w = (0.02 * torch.randn(E, D, device="cuda", generator=gen)).to(weight_dtype)
        g = torch.randn(T, E, device="cuda", generator=gen)
        assert router_gemm.fp32_kernels(x, w)
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        logits = router_gemm.router_logits(x_, w_)
        logits.backward(g)
        x64, w64, g64 = x.double(), w.double(), g.double()
        ref = x64 @ w64.T
        assert ((logits.double() - ref).abs() <= D * 2**-24 * (x64.abs() @ w64.abs().T)).all()
        assert _rel(logits, ref) <= 1e-6, (E, _rel(logits, ref), _rel(x.float() @ w.float().T, ref))
        dw_sgemm = _rel((g.T @ x.float()).to(weight_dtype), g64.T @ x64)
        assert _rel(w_.grad, g64.T @ x64) <= max(1.01 * dw_sgemm, 1e-6), (E, dw_sgemm)
        assert _rel(x_.grad, g64 @ w64) <= 1.01 * _rel((g @ w.float()).to(torch.bfloat16), g64 @ w64)
        again, _ = router_gemm.router_logits_op(x, w)
        dx2, dw2 = router_gemm.router_logits_backward(g, x, _, w, True, True)
        assert torch.equal(again, logits.detach()) and torch.equal(dx2, x_.grad) and torch.equal(dw2, w_.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_gpu_bf16_gemms_near_fp32_accuracy(weight_dtype):
    """The CUDA path of routers wider than 16 experts (bf16 GEMMs with fp32 output) against fp64,
    at a router's shape (4096 tokens, D 2048, 64 experts). Every product is exact, but Hopper's tensor cores do not add in IEEE
    fp32: on an H100 the logits came within 2.1e-6 of fp64 (relative norm; an fp32 SGEMM: 2-6e-7,
    bf16 logits as transformers computes them under autocast: about 4e-3). The bounds: 1e-5 for
    logits and weight gradient, the bf16 rounding of the upcast path for the input gradient."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4096, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    w = (0.02 * torch.randn(64, 2048, device="cuda", generator=gen)).to(weight_dtype)
    g = torch.randn(4096, 64, device="cuda", generator=gen)
    router = Router(2048, 64, "softmax_topk", 8).cuda()
    with torch.no_grad():
        router.weight.data = w.clone()
    assert router_gemm.applies(x, router.weight) and not router_gemm.fp32_kernels(x, router.weight)
    x_ = x.clone().requires_grad_()
    logits = router.logits(x_)
    logits.backward(g)
    x64, w64, g64 = x.double(), w.double(), g.double()
    errors = {
        "logits": _rel(logits, x64 @ w64.T),
        "logits fp32 sgemm": _rel(x.float() @ w.float().T, x64 @ w64.T),
        "logits bf16": _rel(x @ w.to(torch.bfloat16).T, x64 @ w64.T),
        "dW": _rel(router.weight.grad, g64.T @ x64),
        "dW fp32 sgemm": _rel((g.T @ x.float()).to(weight_dtype), g64.T @ x64),
        "dx": _rel(x_.grad, g64 @ w64),
        "dx upcast": _rel((g @ w.float()).to(torch.bfloat16), g64 @ w64),
    }
    assert errors["logits"] <= 1e-5 and errors["logits"] * 100 <= errors["logits bf16"], errors
    assert errors["dW"] <= max(1e-5, 1.01 * errors["dW fp32 sgemm"]), errors
    assert errors["dx"] <= 1.01 * errors["dx upcast"], errors
    compiled = torch.compile(router.logits, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), logits.detach(), rtol=0, atol=0)
