"""The fused LM head + cross-entropy (`upcycle.kernels.cross_entropy`).

- The kernel, through Triton's CPU interpreter, against fp64: each row's loss within fp32's error,
  the gradient written over the logits within one bf16 rounding of (softmax − one-hot) / count,
  ignored rows zero, a vocabulary that does not fill its last block, and a label outside the
  vocabulary giving NaN.
- The autograd function, in the interpreter: the loss of torch's computation (`reference`, the
  same bf16 logits) within fp32 rounding; dh and dW against fp64, no further from it than
  torch's own bf16 computation is, with incoming gradients 1 and 0.5.
- `TrainStep`'s fused path in the interpreter (fp32, two micro-batches, aux losses): the loss
  parts and every gradient of torch's loss.
- Without the interpreter on the CPU, `linear_cross_entropy` is `reference`.
- On a GPU: `TrainStep` with the fused loss against the same step with torch's loss, and the
  kernel counted, so that a fallback cannot pass for it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from triton_helpers import run_interpreted

from upcycle.kernels import cross_entropy

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


def fp64_reference(x, w, labels):
    """Loss, per-row gradient of the logits, dx and dW of the mean cross-entropy, in fp64."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    logits = (x64 @ w64.t()).requires_grad_(True)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    loss.backward()
    return loss.detach(), logits.grad, x64.grad, w64.grad


exact_rows_and_gradient = cross_entropy.exact_rows_and_gradient


INTERPRETED = """
import math
import torch
from test_cross_entropy import exact_rows_and_gradient, fp64_reference
from upcycle.kernels import cross_entropy as ce

def bf16_ulp(t):
    t = t.to(torch.bfloat16).float()
    up = torch.nextafter(t.to(torch.bfloat16), torch.full_like(t, math.inf).to(torch.bfloat16)).float()
    return (up - t).abs().double()

calls = []
launch = ce.cross_entropy_rows_
ce.cross_entropy_rows_ = lambda *a: (calls.append(a[0].shape), launch(*a))[1]
g = torch.Generator().manual_seed(0)
for T, D, V in ((37, 16, 1000), (20, 32, 40000)):   # the row at once; two blocks, the last partial
    x = (torch.randn(T, D, generator=g) * 2).to(torch.bfloat16)
    w = torch.randn(V, D, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[3] = -100
    labels[7] = -100
    logits = (x.float() @ w.float().t()).to(torch.bfloat16)   # what the GEMM stores
    count = (labels != -100).sum().float()
    buffer = logits.clone()
    losses = ce.cross_entropy_rows_(buffer, labels, count)
    expected_rows, grad = exact_rows_and_gradient(logits, labels, count)
    assert torch.allclose(losses.double(), expected_rows, rtol=5e-7, atol=1e-6), (losses - expected_rows).abs().max()
    error = (buffer.double() - grad).abs()
    # one bf16 rounding of the exact value, plus fp32's error on softmax terms of size 1/count
    assert bool((error <= bf16_ulp(grad) + 1e-6 / float(count)).all()), float((error - bf16_ulp(grad)).max())
    assert torch.equal(buffer[3], torch.zeros(V, dtype=torch.bfloat16))

    # the autograd function: no further from fp64 than torch's bf16 computation
    for scale in (1.0, 0.5):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = ce.linear_cross_entropy(xs[None], ws, labels[None])
        (loss * scale).backward()
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = ce.reference(xr[None], wr, labels[None])
        (ref * scale).backward()
        loss64, _, dx64, dw64 = fp64_reference(x, w, labels)
        # the same bf16 logits as torch's: the same loss up to fp32 rounding
        assert abs(float(loss) - float(ref)) <= 2e-6 * abs(float(ref)), (float(loss), float(ref))
        for ours, theirs, exact64 in ((xs.grad, xr.grad, dx64 * scale), (ws.grad, wr.grad, dw64 * scale)):
            assert ours.dtype == torch.bfloat16 and ours.shape == exact64.shape
            ours_error = float((ours.double() - exact64).norm())
            torch_error = float((theirs.double() - exact64).norm())
            assert ours_error <= 1.25 * torch_error + 1e-12, (ours_error, torch_error)

# a label outside the vocabulary: NaN, not a read out of bounds
buffer = torch.zeros(2, 100, dtype=torch.bfloat16)
losses = ce.cross_entropy_rows_(buffer, torch.tensor([5, 100]), torch.tensor(2.0))
assert math.isfinite(float(losses[0])) and math.isnan(float(losses[1]))
assert len(calls) == 2 + 2 * 2 + 1, calls
print("interpreted ok")
"""


@needs_triton
def test_kernel_and_function_in_the_interpreter_against_fp64() -> None:
    assert "interpreted ok" in run_interpreted(INTERPRETED, timeout=300)


def test_without_the_kernel_it_is_torchs_computation() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 5, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (2, 5), generator=g)
    labels[0, 0] = -100
    if cross_entropy.applies(x):
        pytest.skip("the fused kernel applies here")
    got = cross_entropy.linear_cross_entropy(x, w, labels)
    expected = torch.nn.functional.cross_entropy((x @ w.t()).flatten(0, 1), labels.flatten())
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_step_with_the_fused_loss_matches_torchs_loss(monkeypatch) -> None:
    """One step of a bf16-weights MoE: the same loss (fp32 rounding), the same gradient norm and
    weights within bf16 roundings of the logits' gradient."""
    from test_cuda_graph import _batches, _step

    calls = []
    launch = cross_entropy.cross_entropy_rows_
    monkeypatch.setattr(cross_entropy, "cross_entropy_rows_", lambda *a: (calls.append(1), launch(*a))[1])
    fused, plain = _step(False), _step(False)
    plain.fused_lm_loss = False
    assert fused.fused_lm_loss
    data = _batches(2)
    for index, batch in enumerate(data):
        a, b = fused(index + 1, [batch]), plain(index + 1, [batch])
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-2)
    assert len(calls) == len(data)
    for p, q in zip(fused.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p.float(), q.float(), rtol=0.02, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [32000, 50000], ids=["row-in-registers", "blocked"])
def test_gpu_kernel_rounds_to_nearest(vocab: int) -> None:
    """On the GPU (round-to-nearest stores, unlike the interpreter's truncation): each gradient
    element within half a bf16 unit of the fp64 value, plus fp32's error; the row losses within
    fp32's error; and torch's own bf16 gradient of the same logits at most one unit away."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(64, vocab, generator=g, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (64,), generator=g, device="cuda")
    labels[5] = -100
    count = (labels != -100).sum().float()
    buffer = logits.clone()
    losses = cross_entropy.cross_entropy_rows_(buffer, labels, count)
    rows, exact = exact_rows_and_gradient(logits, labels, count)
    torch.testing.assert_close(losses.double(), rows, rtol=2e-6, atol=2e-6)
    # half a bf16 unit in the last place of each exact value: |v| in [2^(e-1), 2^e) has units
    # of 2^(e-8) (8 significant bits)
    _, exponent = torch.frexp(exact.abs())
    half_ulp = torch.ldexp(torch.ones_like(exact), exponent - 9)
    error = (buffer.double() - exact).abs()
    assert bool((error <= half_ulp + 1e-6 * exact.abs() + 1e-12).all()), float((error - half_ulp).max())
    reference = logits.float().requires_grad_(True)
    torch.nn.functional.cross_entropy(reference, labels).backward()
    theirs = reference.grad.to(torch.bfloat16)
    assert int((buffer.float() - theirs.float()).abs().gt(2 * half_ulp.float() + 1e-12).sum()) == 0


IN_THE_STEP = """
import torch
from test_train_step_fast import batches, make_step
from upcycle.kernels import cross_entropy as ce
from upcycle.train.step import model_inputs

calls = []
launch = ce.cross_entropy_rows_
ce.cross_entropy_rows_ = lambda *a: (calls.append(1), launch(*a))[1]
fused, plain = make_step(False, 1.0), make_step(False, 1.0)
fused.fused_lm_loss, plain.fused_lm_loss = True, False
first, second = batches(2)
# the forward and backward passes of one step, two micro-batches, from the same weights: loss
# parts and gradients (comparing weights after AdamW would not do: its first updates are about
# lr · sign(g), which turns last-place differences of tiny gradients into whole steps)
inputs = [model_inputs(batch, torch.device("cpu")) for batch in (first, second)]
(sums_a, kinds_a), (sums_b, kinds_b) = fused._forward_backward(inputs), plain._forward_backward(inputs)
assert kinds_a == kinds_b and kinds_a
for x, y in zip(sums_a, sums_b, strict=True):
    torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
for (name, p), q in zip(fused.model.named_parameters(), plain.model.parameters(), strict=True):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)
result = fused(1, [first, second])  # and the whole step runs
assert not result.skipped and abs(result.loss - float(sums_b[0]) / 2) <= 1e-6 * abs(result.loss)
assert len(calls) == 4, calls
print("in the step ok")
"""


@needs_triton
def test_train_step_with_the_fused_loss_in_the_interpreter() -> None:
    """`TrainStep`'s fused path (hidden states, the LM head's weight, the aux losses beside the
    fused loss, two micro-batches) in fp32 on the CPU through the interpreter: the loss parts and
    every gradient of the same passes with torch's loss."""
    assert "in the step ok" in run_interpreted(IN_THE_STEP, timeout=300)


@needs_triton
def test_cross_entropy_bench_smoke() -> None:
    """bench/cross_entropy.py in the interpreter: every launch configuration agrees with fp64 and
    a table comes out."""
    out = run_interpreted(
        "import sys\nsys.path.insert(0, 'bench')\nfrom benchlib import load_script\n"
        "assert load_script('cross_entropy').main(['--cpu-smoke']) == 0\n"
    )
    rows = [
        line.split(" | ")
        for line in out.splitlines()
        if line.startswith("| fused") or line.startswith("| torch")
    ]
    assert [r[0] for r in rows] == [
        "| fused, block 512, 4 warps",
        "| fused, block 128, 4 warps",
        "| torch, eager",
    ]
    assert all(r[-1] == "ok |" for r in rows)


SCALE = """
import torch
from upcycle.kernels import cross_entropy as ce
g = torch.Generator().manual_seed(0)
s = torch.tensor(0.3, dtype=torch.float32)
x32 = torch.randn(5000, generator=g)  # a partial second block
got32 = ce.scale_(x32.clone(), s)
assert torch.equal(got32, x32 * s), "fp32: one rounding, as mul_"
x16 = torch.randn(70, 90, generator=g).to(torch.bfloat16)
got16 = ce.scale_(x16.clone(), s)
exact = x16.double() * s.double()
unit = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.abs())[1] - 8)
assert bool(((got16.double() - exact).abs() <= unit).all()), "bf16: within one unit (the interpreter truncates)"
strided = torch.randn(8, 6, generator=g).t()
assert torch.equal(ce.scale_(strided.clone(), s), strided * s), "non-contiguous: torch's mul_"
print("ok")
"""


@needs_triton
def test_scale_kernel_in_the_interpreter() -> None:
    """`scale_` (the LM head's dx and dW times the incoming gradient): fp32 exactly torch's
    product, bf16 within one unit of fp64's (the interpreter truncates), strided input through
    torch."""
    assert run_interpreted(SCALE).strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_scale_is_the_fp32_product_rounded_once() -> None:
    """On the GPU `scale_` is x times the fp32 scale rounded once, bit for bit: what torch's
    `mul_` gives on the CPU (test_cpu_mul_by_a_0dim_tensor_is_the_fp32_product) and on the GPU
    when the scale is a bf16 number; torch's GPU `mul_` rounds 1/3 to bf16 first."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(16384 + 7, 1024, generator=g, device="cuda").to(dtype)
        for value in (1 / 3, 0.5, 1.0):
            s = torch.tensor(value, device="cuda")
            got = cross_entropy.scale_(x.clone(), s)
            assert torch.equal(got, (x.float() * s).to(dtype)), (dtype, value)
            if value != 1 / 3 or dtype == torch.float32:
                assert torch.equal(got, x.clone().mul_(s)), (dtype, value)


def test_cpu_mul_by_a_0dim_tensor_is_the_fp32_product() -> None:
    """The CPU fallback of `scale_` (torch's `mul_`) computes what the GPU pass does."""
    g = torch.Generator().manual_seed(0)
    s = torch.tensor(1 / 3)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(300, 200, generator=g).to(dtype)
        assert torch.equal(cross_entropy.scale_(x.clone(), s), (x.float() * s).to(dtype)), dtype
        assert not torch.equal((x.float() * s).to(dtype), (x.float() * s.to(dtype).float()).to(dtype))


NONFINITE_IGNORED = """
import torch
from upcycle.kernels import cross_entropy as ce
for V, block in ((300, None), (300, 128)):  # the row in registers, then blocks
    logits = torch.randn(4, V).to(torch.bfloat16)
    logits[1, 7], logits[2, 9] = float("nan"), float("inf")
    labels = torch.tensor([3, -100, -100, 5])
    count = (labels != -100).sum().float()
    losses = ce.cross_entropy_rows_(logits, labels, count, block=block)
    assert bool((logits[1:3] == 0).all()), "ignored rows: a zero gradient whatever they hold"
    assert bool(torch.isfinite(logits).all()) and bool(torch.isfinite(losses).all())
print("ok")
"""


@needs_triton
def test_ignored_rows_with_nonfinite_logits_get_a_zero_gradient() -> None:
    assert run_interpreted(NONFINITE_IGNORED).strip().endswith("ok")
