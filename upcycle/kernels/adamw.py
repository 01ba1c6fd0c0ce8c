"""AdamW's update of large tensors as one Triton pass each, at the card's memory bandwidth.

torch's fused AdamW (`torch._fused_adamw_`) spends 4.75 ms per step on the Mixtral-shaped
bench model's 640M bf16 parameters (bench/RESULTS.md, sixth round): about 56% of an H100's
bandwidth for the 14 bytes a parameter that AdamW must move (read weight, gradient and both
moments; write weight and moments). Two things cost it: its multi-tensor launches cut every
tensor into 64K-element chunks, and with `grad_scale` (how `upcycle.train.step` applies gradient
clipping) it also writes the rescaled gradient back, 2 more bytes a parameter that nothing reads.
`adamw_` here updates one contiguous tensor per launch, reads the gradient and leaves it as it is:
3.14 ms against torch's 4.67 ms for the same step on an H100, 85% of its bandwidth (bench/
optimizer_step.py; bench/RESULTS.md, seventh round).

The update is torch's (decoupled weight decay, bias corrections from the step count held on the
device, in fp32 whatever the storage dtype, one rounding on store):

    g  = grad / grad_scale                      (when a scale is given)
    p ← p − lr · weight_decay · p
    m ← β1 · m + (1 − β1) · g
    v ← β2 · v + (1 − β2) · g²
    p ← p − lr / (1 − β1^step) · m / (√v / √(1 − β2^step) + ε)

(no decay term when weight_decay is 0) and a `found_inf` flag of 1 leaves weight and moments
untouched (the caller takes the step back, as torch does). The two bias-correction factors come
from `bias_factors`, computed in fp64 from the step counts on the device (a few small kernels for
all tensors of a group, no host synchronisation), with the learning rate in fp32 beside them (a
float, or a tensor on the device, which a CUDA graph replays with each step's value: see
`upcycle.train.cuda_graph`); in-kernel exp2/log2 would be the GPU's
approximate ones, whose error reached 2·10⁻⁶ of an fp32 update (H100, run M). Square root and
divisions are IEEE-rounded, as in torch's kernel. tests/test_adamw.py checks the kernel (through
Triton's CPU interpreter) against an fp64 reference and, on the GPU, against torch's fused kernel
step by step from the same state.

Used by `upcycle.train.optim.AdamW` for tensors of at least `MIN_NUMEL` elements; smaller
tensors go to torch's multi-tensor kernel, which packs many of them into one launch.
"""

from __future__ import annotations

import torch

from upcycle.kernels.swiglu import kernels, launch_device, triton_installed, triton_interpreted

# Tensors below this size stay with torch's multi-tensor kernel: one launch per tensor costs
# more than it saves for a norm's weight or a router.
MIN_NUMEL = 1 << 22
_BLOCK = 2048
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(param: torch.Tensor, *state: torch.Tensor) -> bool:
    """Whether `adamw_` can update `param` with its gradient and the moment tensors `state`
    (plain contiguous tensors of one float dtype and shape on one CUDA device, at least
    `MIN_NUMEL` elements, Triton importable). Without `state`, the parameter and gradient alone."""
    grad = param.grad
    if grad is None or param.numel() < MIN_NUMEL or param.dtype not in DTYPES:
        return False
    tensors = (param.data, grad, *state)
    return (
        all(type(t) is torch.Tensor and not t.is_sparse and t.is_contiguous() for t in tensors)
        and all(
            t.device == param.device and t.dtype == param.dtype and t.shape == param.shape for t in tensors
        )
        and (param.is_cuda or triton_interpreted())
        and triton_installed()
    )


def adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    factors: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW update of `param`, `exp_avg` and `exp_avg_sq` in place (module docstring).

    `factors`: this tensor's row of `bias_factors` (three fp32 values on the device: the
    bias corrections and the learning rate);
    `grad_scale` divides the gradient; `found_inf` of 1.0 skips the update (0.0 does not).
    `grad` is read, never written.
    """
    n = param.numel()
    if n == 0:
        return
    check_scalars(grad_scale, found_inf)
    if factors.dtype != torch.float32 or factors.numel() != 3 or not factors.is_contiguous():
        raise ValueError("adamw_: factors must be a contiguous row of three fp32 values (bias_factors)")
    # the kernel reads these through pointers: they must live where the weights do (torch's
    # AdamW moves them the same way; a no-op when they already do)
    grad_scale, found_inf, factors = (
        t if t is None else t.to(param.device, non_blocking=True) for t in (grad_scale, found_inf, factors)
    )
    tk = kernels()
    with launch_device(param):
        tk.adamw_kernel[(tk.triton.cdiv(n, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, factors,
            grad_scale if grad_scale is not None else factors,
            found_inf if found_inf is not None else factors,
            n, float(beta1), float(beta2), float(eps), float(weight_decay),
            HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None, HAS_DECAY=weight_decay != 0,
            BLOCK=_BLOCK, num_warps=8,
        )  # fmt: skip


def check_scalars(grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """`grad_scale` and `found_inf` hold one value each, where given."""
    for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if value is not None and value.numel() != 1:
            raise ValueError(f"AdamW: {name} must hold one value, got shape {tuple(value.shape)}")


def bias_factors(
    steps: list[torch.Tensor], lr: float | torch.Tensor, beta1: float, beta2: float
) -> torch.Tensor:
    """[len(steps), 3] fp32: (lr / (1 − β1^step), √(1 − β2^step), lr) for each step count (this
    step's, after its increment), computed in fp64 on the steps' device. `lr`: a float or a
    one-value tensor (its value as stored: a float32 tensor holds the float's fp32 rounding)."""
    step = torch.stack([s.reshape(()) for s in steps]).double()
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"AdamW: a tensor lr must hold one value, got shape {tuple(lr.shape)}")
        lr = lr.reshape(()).to(step.device, torch.float64, non_blocking=True)
    first = lr / (1.0 - torch.pow(beta1, step))
    second = torch.sqrt(1.0 - torch.pow(beta2, step))
    rate = torch.zeros_like(step) + lr  # the fp64 value, rounded once to fp32 below
    return torch.stack([first, second, rate], dim=1).float()
