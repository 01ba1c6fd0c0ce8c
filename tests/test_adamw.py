"""upcycle's AdamW (`upcycle.train.optim.AdamW`, kernel `upcycle.kernels.adamw`).

- The Triton kernel, through Triton's CPU interpreter: each of three steps against an fp64
  evaluation of torch's update from the same stored state (within one rounding of the storage
  dtype), with weight decay, a gradient scale and a tensor that does not fill its last block;
  the step taken back by `found_inf`; the gradient left as it was; and the kernel counted, so
  that a fallback to torch's kernel cannot pass for it.
- Without the interpreter on the CPU, every tensor goes to torch's fused kernel: bit for bit
  torch's AdamW; state dicts load across both; step hooks run once.
- On a GPU: against torch's fused AdamW on the same bf16 / fp32 tensors.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from triton_helpers import run_interpreted

from upcycle.kernels import adamw as adamw_kernel
from upcycle.train.optim import AdamW, build_optimizer

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


def reference_step(param, grad, exp_avg, exp_avg_sq, step, *, lr, betas, eps, weight_decay, scale):
    """torch's AdamW update in fp64 from the stored tensors, rounded once to their dtype."""
    beta1, beta2 = betas
    p, g, m, v = (t.double() for t in (param, grad, exp_avg, exp_avg_sq))
    g = g / scale
    p = p - lr * weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / (1 - beta2**step) ** 0.5 + eps
    p = p - lr / (1 - beta1**step) * m / denom
    return tuple(t.to(param.dtype) for t in (p, m, v))


def rounding_excess(expected: torch.Tensor, got: torch.Tensor, before: torch.Tensor) -> str:
    """'' when `got` (computed in fp32, stored in its dtype) is `expected` (fp64 or another fp32
    computation, rounded to the same dtype) up to one unit in the last place of the stored value
    plus the fp32 arithmetic's own error on operands the size of `before` and the result (terms
    that cancel leave a small result whose last place is finer than that error); otherwise a
    description of the worst element."""
    e, g, b = (t.detach().double().cpu() for t in (expected, got, before))
    top = torch.full_like(expected, float("inf"))
    ulp = (torch.nextafter(expected.detach().float(), top.float()).double().cpu() - e.float().double()).abs()
    ulp = torch.maximum(ulp, e.abs() * torch.finfo(expected.dtype).eps)
    tolerance = ulp + 8 * torch.finfo(torch.float32).eps * (b.abs() + e.abs())
    excess = (e - g).abs() / tolerance
    i = int(excess.argmax())
    if excess.view(-1)[i] <= 1:
        return ""
    flat = lambda t: float(t.reshape(-1)[i])  # noqa: E731
    return f"element {i}: expected {flat(e)}, got {flat(g)}, before {flat(b)}, {float(excess.max()):.1f}x the tolerance"


INTERPRETED = """
import torch
from test_adamw import reference_step, rounding_excess
from upcycle.kernels import adamw as adamw_kernel
from upcycle.train.optim import AdamW

adamw_kernel.MIN_NUMEL = 1000
calls = []
launch = adamw_kernel.adamw_
adamw_kernel.adamw_ = lambda *a, **k: (calls.append(a[0].shape), launch(*a, **k))[1]

def check(opt, param, before, grad, step, scale, hp):
    expected = reference_step(*before[:1], grad, *before[1:], step, scale=scale, **hp)
    got = (param.detach(), opt.state[param]["exp_avg"], opt.state[param]["exp_avg_sq"])
    # the size of what each result sums: weight; β1·m and (1 − β1)·g (which can cancel); v
    sizes = (before[0], before[1].double().abs() + grad.double().abs() / scale, expected[2])
    for name, e, o, b in zip(("weight", "exp_avg", "exp_avg_sq"), expected, got, sizes):
        message = rounding_excess(e, o, b)
        assert not message, (param.dtype, step, name, message)
    assert not torch.equal(got[0], before[0])
    assert torch.equal(param.grad, grad), "the kernel must not write the gradient"
    assert float(opt.state[param]["step"]) == step

for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(torch.randn(5000, generator=g).to(dtype))     # 3 blocks, last one partial
    late = torch.nn.Parameter(torch.randn(1200, generator=g).to(dtype))    # same group, no gradient at step 1
    other = torch.nn.Parameter(torch.randn(1500, generator=g).to(dtype))   # a group without weight decay
    small = torch.nn.Parameter(torch.randn(10, generator=g).to(dtype))     # torch's kernel
    betas, eps = (0.9, 0.95), 1e-8
    decayed, plain = dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0)
    hps = {id(big): decayed, id(late): decayed, id(other): plain}
    opt = AdamW([{"params": [big, late, small], **decayed}, {"params": [other], **plain}], betas=betas, eps=eps)
    steps = {id(p): 0 for p in (big, late, other)}
    for step in (1, 2, 3):
        scale = 1.0 + step
        opt.grad_scale = torch.tensor(scale)
        opt.found_inf = torch.tensor(0.0)  # what TrainStep hands over on every finite step
        grads = {}
        for p in (big, late, other):
            grads[id(p)] = torch.randn(p.shape, generator=g).to(dtype)
            p.grad = grads[id(p)].clone() if (p is not late or step > 1) else None
        small.grad = torch.randn(10, generator=g).to(dtype)
        befores = {}
        for p in (big, late, other):
            state = opt.state[p]
            moments = [state[k].clone() for k in ("exp_avg", "exp_avg_sq")] if state else [torch.zeros_like(p)] * 2
            befores[id(p)] = (p.detach().clone(), *moments)
        opt.step()
        for p in (big, late, other):
            if p.grad is None:
                assert not opt.state[p] and torch.equal(p.detach(), befores[id(p)][0])
                continue
            steps[id(p)] += 1
            check(opt, p, befores[id(p)], grads[id(p)], steps[id(p)], scale, dict(hps[id(p)], betas=betas, eps=eps))
    # a non-finite step: nothing moves, the step count is taken back
    snapshot = (big.detach().clone(), opt.state[big]["exp_avg"].clone(), opt.state[big]["exp_avg_sq"].clone())
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, (big.detach(), opt.state[big]["exp_avg"], opt.state[big]["exp_avg_sq"])))
    assert [float(opt.state[p]["step"]) for p in (big, late, other)] == [3, 2, 3]
    del opt.found_inf, opt.grad_scale
one_run = [(5000,), (1500,)] + [(5000,), (1200,), (1500,)] * 2 + [(5000,), (1200,), (1500,)]
assert calls == one_run * 2, calls
print("interpreted ok")
"""


@needs_triton
def test_kernel_in_the_interpreter_matches_fp64_reference() -> None:
    assert "interpreted ok" in run_interpreted(INTERPRETED, timeout=300)


TENSOR_LR = """
import torch
from upcycle.kernels import adamw as adamw_kernel
from upcycle.train.optim import AdamW

adamw_kernel.MIN_NUMEL = 1000
calls = []
launch = adamw_kernel.adamw_
adamw_kernel.adamw_ = lambda *a, **k: (calls.append(a[0].shape), launch(*a, **k))[1]
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(2)
    start = torch.randn(3000, generator=g).to(dtype)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_a = AdamW([a], lr=1.0, weight_decay=0.1)
    rate = torch.zeros((), dtype=torch.float32)
    opt_b = AdamW([b], lr=1.0, weight_decay=0.1)
    for group in opt_b.param_groups:  # as upcycle.train.cuda_graph sets them
        group["lr"], group["capturable"] = rate, True
    for lr in (2**-7, 2**-8, 3 * 2**-9):  # exact in fp32: the tensor holds the float itself
        for group in opt_a.param_groups:
            group["lr"] = lr
        rate.fill_(lr)
        grad = torch.randn(3000, generator=g).to(dtype)
        a.grad, b.grad = grad.clone(), grad.clone()
        for opt in (opt_a, opt_b):
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
            opt.step()
        assert torch.equal(a, b), (dtype, lr)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key]), (dtype, lr, key)
    assert not torch.equal(a, start)
assert len(calls) == 12, calls
print("tensor lr ok")
"""


@needs_triton
def test_tensor_learning_rate_and_capturable_groups_take_the_kernel_bit_for_bit() -> None:
    """A CUDA-graphed step hands the optimiser its learning rate in a float32 tensor and marks
    the groups capturable: the Triton pass takes them and gives the float's update bit for bit."""
    assert "tensor lr ok" in run_interpreted(TENSOR_LR, timeout=300)


def _pair(dtype: torch.dtype, numel: int = 3000):
    g = torch.Generator().manual_seed(1)
    start = torch.randn(numel, generator=g).to(dtype)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    return ours, theirs, g


def test_without_triton_kernels_it_is_torch_fused_adamw_bit_for_bit() -> None:
    """On the CPU (no interpreter) `supports` refuses every tensor: torch's kernel does it all."""
    ours, theirs, g = _pair(torch.float32)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    a, b = AdamW([ours], **hp), torch.optim.AdamW([theirs], fused=True, **hp)
    for _ in range(3):
        grad = torch.randn(ours.shape, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.grad_scale = b.grad_scale = torch.tensor(2.0)
        a.step(), b.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(a.state[ours]["exp_avg_sq"], b.state[theirs]["exp_avg_sq"])
    # the same state format both ways
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())
    assert a.state[ours]["step"].dtype == torch.float32


def test_unfused_checkpoint_loads_into_a_fused_optimiser() -> None:
    """An unfused run's state dict (CPU training) turns each group's `fused` off and keeps step
    counts as they were; upcycle's AdamW keeps itself fused, so that `grad_scale` stays legal."""
    ours, theirs, g = _pair(torch.float32)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    unfused = torch.optim.AdamW([theirs], foreach=False, **hp)
    theirs.grad = torch.randn(theirs.shape, generator=g)
    unfused.step()
    a = AdamW([ours], **hp)
    a.load_state_dict(copy.deepcopy(unfused.state_dict()))  # loading may keep the very tensors
    assert a.param_groups[0]["fused"] is True and a.param_groups[0]["foreach"] is None
    assert a.state[ours]["step"].dtype == torch.float32 and float(a.state[ours]["step"]) == 1
    b = torch.optim.AdamW([theirs], fused=True, **hp)
    b.load_state_dict(copy.deepcopy(unfused.state_dict()))
    ours.data.copy_(theirs.data)
    grad = torch.randn(ours.shape, generator=g)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    a.grad_scale = torch.tensor(2.0)
    theirs.grad /= 2.0
    a.step(), b.step()  # torch's fused AdamW would refuse the scale after such a load
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)  # b: unfused now


def test_an_error_in_torchs_part_leaves_the_large_tensors_alone(monkeypatch) -> None:
    """torch's kernel runs first; if it raises, no large tensor has moved and every gradient
    is back on its parameter."""
    import upcycle.train.optim as optim

    monkeypatch.setattr(adamw_kernel, "MIN_NUMEL", 100)
    monkeypatch.setattr(adamw_kernel, "triton_interpreted", lambda: True)
    big, small = torch.nn.Parameter(torch.randn(500)), torch.nn.Parameter(torch.randn(5))
    grads = [torch.randn(500), torch.randn(5)]
    big.grad, small.grad = grads
    opt = AdamW([big, small], lr=0.1)
    before = big.detach().clone()

    def fails(optimizer):
        assert big.grad is None and small.grad is grads[1]  # ours hidden from torch's step
        raise RuntimeError("torch's step failed")

    monkeypatch.setattr(optim, "_torch_step", fails)
    with pytest.raises(RuntimeError, match="torch's step failed"):
        opt.step()
    assert big.grad is grads[0] and small.grad is grads[1]
    assert torch.equal(big.detach(), before) and float(opt.state[big]["step"]) == 0


def test_step_hooks_run_once_although_torch_adamw_exists() -> None:
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # torch now wraps its own step
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = AdamW([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    opt.step()
    assert calls == ["pre", "post"]


def test_refuses_unfused() -> None:
    with pytest.raises(ValueError, match=r"torch\.optim\.AdamW"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], fused=False)


def test_build_optimizer_on_cpu_is_torch_adamw() -> None:
    from upcycle.train.config import OptimizerConfig

    model = torch.nn.Linear(4, 4)
    assert type(build_optimizer(model, OptimizerConfig(lr=1e-3), torch.device("cpu"))) is torch.optim.AdamW


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_torch_fused_adamw(dtype: torch.dtype) -> None:
    """Five steps with clipping-style gradient scales against torch's fused kernel, each step
    from the same state (torch's copy of weights and moments reset to ours first, so that
    roundings cannot add up): at most one rounding apart; a found_inf step a no-op."""
    torch.manual_seed(0)
    shapes = [(8, 1024, 2816), (adamw_kernel.MIN_NUMEL + 7,), (1024,)]
    ours = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    a, b = AdamW(ours, **hp), torch.optim.AdamW(theirs, fused=True, **hp)
    assert [adamw_kernel.supports(p) for p in ours] == [False] * 3, "no gradients yet"
    for step in range(5):
        for p, q in zip(ours, theirs, strict=True):
            q.data.copy_(p.data)
            if a.state[p]:
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    b.state[q][key].copy_(a.state[p][key])
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        supported = [adamw_kernel.supports(p) for p in ours]
        assert supported == [True, True, False], supported
        a.grad_scale = b.grad_scale = torch.tensor(1.0 + step, device="cuda")
        a.found_inf = b.found_inf = torch.tensor(0.0, device="cuda")  # TrainStep's finite steps
        snapshot = [p.detach().clone() for p in ours]
        # the size of what each result sums: weight; β1·m and (1 − β1)·g (which can cancel); v
        m_before = [a.state[p]["exp_avg"].clone() if a.state[p] else torch.zeros_like(p) for p in ours]
        a.step(), b.step()
        for i, (p, q, before, m) in enumerate(zip(ours, theirs, snapshot, m_before, strict=True)):
            terms = {
                "weight": before,
                "exp_avg": m.double().abs() + p.grad.double().abs() / (1.0 + step),
                "exp_avg_sq": b.state[q]["exp_avg_sq"],
            }
            for key, size in terms.items():
                got, expected = (p, q) if key == "weight" else (a.state[p][key], b.state[q][key])
                message = rounding_excess(expected, got, size)
                assert not message, f"step {step}, tensor {i}, {key}: {message}"
            assert float(a.state[p]["step"]) == float(b.state[q]["step"]) == step + 1
    snapshot = [p.detach().clone() for p in ours]
    a.found_inf = torch.tensor(1.0, device="cuda")
    a.step()
    assert all(torch.equal(s, p) for s, p in zip(snapshot, ours, strict=True)), "found_inf moved a weight"
    steps = [float(a.state[p]["step"]) for p in ours]
    assert steps == [5.0] * 3, steps


def test_optimizer_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/optimizer_step.py on the CPU: both optimisers step, agree, torch's gradient norm is
    timed (upcycle's needs a GPU or the interpreter: tests/test_grad_norm.py), a table comes out."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from benchlib import load_script

    assert load_script("optimizer_step").main(["--cpu-smoke"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| torch fused AdamW",
        "| upcycle AdamW",
        "| gradient norm: torch get_total_norm",
        "| device copy (read + write)",
    ]
    assert all(r.endswith("| ok |") for r in rows[1:])


def test_train_step_folds_clipping_into_upcycle_adamw() -> None:
    """`TrainStep` hands upcycle's AdamW the clipping factor and the device-side guard as it does
    torch's fused AdamW (the kernel's handling of both is checked above)."""
    from upcycle.train.step import _folds_clipping

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert _folds_clipping(AdamW(params, lr=0.1), params)
    assert not _folds_clipping(torch.optim.AdamW(params, lr=0.1), params)
