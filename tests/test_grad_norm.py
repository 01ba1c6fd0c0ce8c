"""The gradient norm's Triton pass (`upcycle.kernels.grad_norm`), which `TrainStep` uses for
clipping on a GPU (through `upcycle.train.expert_parallel.grad_norm`).

- Through Triton's CPU interpreter, with the block shrunk so that tensors span several programs
  and end in partial blocks: the norm of bf16 / fp32 / fp16 / non-contiguous / empty tensors,
  large and small mixed, the small ones copied into one launch a dtype (when they are few) or
  through `_foreach_norm`, fp64 refused (torch's path), against fp64's norm of the stored values within fp32's summation bound
  (`grad_norm.error_bound`); inf and
  NaN come through; every large tensor is read by the kernel (launches counted) and
  `expert_parallel.grad_norm` takes this path.
- Without the interpreter on the CPU: not taken (torch's `get_total_norm` as before).
- On a GPU: the Mixtral-shaped sizes against fp64, and against torch's norm.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from triton_helpers import run_interpreted

from upcycle.kernels import grad_norm as gn

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)

INTERPRETED = """
import math, torch
from upcycle.kernels import grad_norm as gn, triton_kernels as tk
from upcycle.train.expert_parallel import grad_norm

gn.MIN_NUMEL, gn._BLOCK, gn._ITERS = 300, 64, 2   # 128 elements a program

class Counted:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0
    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]

counted = Counted(tk.sum_squares_kernel)
tk.sum_squares_kernel = counted
g = torch.Generator().manual_seed(0)
def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)

cases = {
    "bf16 large and small": [rand(1000, dtype=torch.bfloat16), rand(37, 11, dtype=torch.bfloat16),
                             rand(5, dtype=torch.bfloat16), rand(300, dtype=torch.bfloat16, scale=1e3)],
    "fp32, a program short and over": [rand(383), rand(385), rand(20, 30, scale=1e-4)],
    "non-contiguous and empty": [rand(40, 25).t(), rand(0), rand(512, dtype=torch.bfloat16)],
    "large only": [rand(4096, dtype=torch.bfloat16), rand(3, 333)],
}
cases["mixed dtypes, small only"] = [rand(7, dtype=torch.bfloat16), rand(9), rand(50, dtype=torch.float16)]
cases["few small, two dtypes"] = [rand(4000, dtype=torch.bfloat16), rand(10), rand(4, 5, dtype=torch.bfloat16)]
concatenated = {"bf16 large and small", "few small, two dtypes"}   # small ones at most 1/8 of all
for fraction in (0.125, 0.0):   # small tensors copied into one launch a dtype, or _foreach_norm
    gn._CAT_FRACTION = fraction
    for name, grads in cases.items():
        before = counted.launches
        norm = gn.total_norm(grads)
        exact = math.sqrt(sum(t.double().square().sum().item() for t in grads))
        error = abs(norm.item() - exact)
        limit = gn.error_bound(grads)
        assert norm.dtype == torch.float32 and norm.shape == ()
        assert error <= limit, (name, fraction, norm.item(), exact, error, limit)
        large = sum(t.numel() >= gn.MIN_NUMEL for t in grads)
        small_dtypes = {t.dtype for t in grads if 0 < t.numel() < gn.MIN_NUMEL}
        cat = gn._concatenates(grads)
        assert cat == (fraction > 0 and name in concatenated), name
        assert counted.launches - before == large + cat * len(small_dtypes), (name, fraction)
gn._CAT_FRACTION = 0.125
assert gn.supports([torch.zeros(5), torch.zeros(3, dtype=torch.float16)])
assert not gn.supports([torch.zeros(5, dtype=torch.float64)])   # fp64 keeps torch's path

grads = cases["bf16 large and small"]
assert gn.supports(grads)
params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
for p, t in zip(params, grads):
    p.grad = t
before = counted.launches
assert torch.equal(grad_norm(params, torch.device("cpu")), gn.total_norm(grads))
assert counted.launches - before == 2 * 4   # 3 large + the small ones, twice: grad_norm took this path

for bad, expect in ((float("inf"), math.isinf), (float("nan"), math.isnan)):
    for index in (0, 2):   # in a large tensor, in a small one
        grads = [rand(1000, dtype=torch.bfloat16), rand(64), rand(5)]
        grads[index].view(-1)[17 % grads[index].numel()] = bad
        assert expect(gn.total_norm(grads).item()), (bad, index)
print("interpreted ok")
"""


@needs_triton
def test_interpreted_norm_against_fp64() -> None:
    assert "interpreted ok" in run_interpreted(INTERPRETED, timeout=300)


def test_cpu_without_interpreter_keeps_torchs_norm() -> None:
    grads = [torch.randn(10), torch.randn(3, 3)]
    assert not gn.supports(grads)
    assert not gn.supports([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_norm_against_fp64_and_torch(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(8, 1024, 5632), (8, 2816, 1024), (32000, 1024), (1024, 1536), (1024,), (8, 1024)]
    grads = [(torch.randn(s, device="cuda", generator=g) * 1e-3).to(dtype) for s in shapes]
    grads.append(grads[0][:, :, :1000].transpose(1, 2))  # a non-contiguous large one is copied
    assert gn.supports(grads)
    norm = gn.total_norm(grads)
    exact = math.sqrt(sum(t.double().square().sum().item() for t in grads))
    assert abs(norm.item() - exact) <= gn.error_bound(grads)
    # torch's norm rounds each tensor's norm to the gradients' dtype first
    reference = torch.nn.utils.get_total_norm(grads, norm_type=2.0).item()
    assert abs(norm.item() - reference) <= 4 * torch.finfo(dtype).eps * exact
