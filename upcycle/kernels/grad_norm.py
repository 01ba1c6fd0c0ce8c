"""The global L2 norm of a model's gradients, large tensors read once each at memory bandwidth.

Gradient clipping needs ‖g‖₂ over every gradient before the optimiser step. torch's
`get_total_norm` runs `_foreach_norm`, whose multi-tensor launches cut each tensor into small
chunks: 0.61–0.72 ms a step for the 1.28 GB of bf16 gradients of the Mixtral-shaped bench model,
1.8–2.1 TB/s on an H100, where one pass at the card's reachable bandwidth (~3.0 TB/s) takes about
0.43 ms. It also rounds each tensor's norm to the gradients' dtype before combining them (bf16:
3 significant digits; 4.5·10⁻⁴ of the bench model's norm).

Measured (H100, graphed, bench/RESULTS.md twelfth round): the Triton pass over the 18 large
tensors takes 0.46 ms (2.7 TB/s); the whole call took 0.697 ms against torch's 0.721 while the
small tensors' concatenation still converted dtypes (0.2 ms, since removed); the training step
did not move beyond its run-to-run spread. What it surely buys is the accuracy below.

`total_norm` reads each tensor of at least `MIN_NUMEL` elements with one Triton launch
(`sum_squares_kernel`): squares and per-lane sums in fp32, one fp64 partial a program. The
smaller tensors (norm weights, routers, attention projections) are copied into one flat tensor
a dtype (`torch.cat`), which one more launch each reads, when they are a small part of the
whole (`_CAT_FRACTION`); otherwise they go to `_foreach_norm` with fp32 results (its
dtype-converting path launches per tensor). Partials and small norms are summed in fp64, so the
result is within fp32's summation bound of the exact norm of the stored gradients (`error_bound`,
in the normal range: squares below fp32's smallest normal number flush to zero, as in torch's
fp32 arithmetic; tests/test_grad_norm.py checks it against fp64), i.e. at least as accurate as
torch's. fp64 gradients keep torch's path (`supports`). A non-finite
gradient gives a non-finite norm (inf², NaN propagate), which is what `TrainStep`'s skip/stop
policy looks for. Returns fp32.
"""

from __future__ import annotations

import math

import torch

# the same "large tensor" as AdamW's pass, and the dtypes it too reads in fp32 (fp64 gradients
# would lose range and precision: they keep torch's path)
from upcycle.kernels.adamw import DTYPES, MIN_NUMEL
from upcycle.kernels.swiglu import kernels, launch_device, triton_installed, triton_interpreted

# A program reads _ITERS blocks of _BLOCK elements (32K: 64 KB of bf16) with _WARPS warps
# (bench/optimizer_step.py varies them)
_BLOCK, _ITERS, _WARPS = 4096, 8, 8
# The small gradients are concatenated (one more launch a dtype) when they are at most this
# fraction of all the elements: a copy of a few % (the bench model's 3.4%) costs less than
# `_foreach_norm`'s per-tensor launches; a model whose weights are all small keeps that path
# rather than copying every gradient once more. 0 sends the small ones to `_foreach_norm`.
_CAT_FRACTION = 0.125


def supports(grads: list[torch.Tensor]) -> bool:
    """Whether `total_norm` takes `grads`: plain fp32/bf16/fp16 tensors on one CUDA device (or
    the CPU under Triton's interpreter), Triton importable. DTensors (FSDP2) and fp64 keep
    torch's path."""
    if not grads or not triton_installed():
        return False
    device = grads[0].device
    return all(
        type(g) is torch.Tensor and not g.is_sparse and g.dtype in DTYPES and g.device == device
        for g in grads
    ) and (device.type == "cuda" or triton_interpreted())


def _programs(numel: int) -> int:
    return -(-numel // (_BLOCK * _ITERS))


def _concatenates(grads: list[torch.Tensor]) -> bool:
    """Whether the small gradients are concatenated for the kernel (`_CAT_FRACTION`)."""
    small = sum(g.numel() for g in grads if g.numel() < MIN_NUMEL)
    return 0 < small <= _CAT_FRACTION * sum(g.numel() for g in grads)


def _kernel_reads(grads: list[torch.Tensor]) -> list[bool]:
    """Which of `grads` the kernel reads (the others go to `_foreach_norm`)."""
    concatenates = _concatenates(grads)
    return [concatenates or g.numel() >= MIN_NUMEL for g in grads]


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖grads‖₂ over all elements of all tensors, an fp32 scalar on their device (module
    docstring). Requires `supports(grads)`."""
    device = grads[0].device
    large = [g for g in grads if g.numel() >= MIN_NUMEL]
    small = [g for g in grads if 0 < g.numel() < MIN_NUMEL]
    if small and _concatenates(grads):
        # a copy of a few % of the elements, one launch a dtype; no dtype conversion (a cat of
        # mixed dtypes converts each tensor in a launch of its own: 0.2 ms for the bench model)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in small:
            by_dtype.setdefault(g.dtype, []).append(g.reshape(-1))
        large += [torch.cat(flat) if len(flat) > 1 else flat[0] for flat in by_dtype.values()]
        small = []
    squares = torch.zeros((), dtype=torch.float64, device=device)
    if large:
        # contiguous: a transposed or sliced gradient (rare) is copied once
        large = [g if g.is_contiguous() else g.contiguous() for g in large]
        partials = torch.empty(sum(_programs(g.numel()) for g in large), dtype=torch.float64, device=device)
        tk, offset = kernels(), 0
        with launch_device(large[0]):
            for g in large:
                count = _programs(g.numel())
                tk.sum_squares_kernel[(count,)](
                    g, partials[offset:], g.numel(), BLOCK=_BLOCK, ITERS=_ITERS, num_warps=_WARPS
                )
                offset += count
        squares = squares + partials.sum()
    if small:
        norms = torch._foreach_norm(small, 2.0, dtype=torch.float32)
        squares = squares + torch.stack(norms).double().square().sum()
    return squares.sqrt().float()


def error_bound(grads: list[torch.Tensor]) -> float:
    """How far `total_norm(grads)` may be from the exact norm of the stored values (computed here
    in fp64, so slow: for tests and benches), for values in fp32's normal range. The kernel
    sums squares in fp32: `_ITERS` terms a lane, each thread's lanes one after another (the
    order no compiler may lengthen), a tree over the program's threads, one rounding each; plus
    the square's own rounding. `_foreach_norm` (small tensors not concatenated) sums in fp32,
    bounded as n terms in a row. The fp64 total is exact by comparison; the square root halves
    the relative error, and the result is rounded once to fp32."""
    u = 2.0**-24
    threads = 32 * _WARPS
    chain = 1 + _ITERS + max(1, _BLOCK // threads) + math.log2(threads) + 1
    read = _kernel_reads(grads)
    large = sum(g.double().square().sum().item() for g, r in zip(grads, read, strict=True) if r)
    small = [(g.numel(), g.double().square().sum().item()) for g, r in zip(grads, read, strict=True) if not r]
    squares_error = chain * u * large + sum((n + 2) * u * s for n, s in small)
    norm = math.sqrt(large + sum(s for _, s in small))
    return squares_error / (2 * norm) + u * norm if norm else 0.0
