"""The LM head and its cross-entropy as one autograd function, the loss's gradient computed in the
forward pass over the logits themselves.

The training step's loss is the mean over label positions of lse(logits_t) − logits_t[label_t]
(`upcycle.train.losses`), logits = h W^T over a vocabulary of tens of thousands. Computed as
torch computes it, the [T, V] logits are read by a softmax in the forward pass and read again,
and a gradient of the same size written, in the backward pass: 1.5 ms per step of the
Mixtral-shaped bench model (vocab 32000, 16k tokens) even fused by torch.compile, two passes
over 1 GiB (bench/RESULTS.md, eighth round). Here one Triton kernel (`cross_entropy_kernel`,
one program per row) holds a row of up to 32768 logits in registers for its maximum and sum of
exponentials (fp32), writes that row's loss, and overwrites the row with
(softmax − one-hot) / (number of label positions), in the logits' dtype: one read and one write
(larger vocabularies: blocks of 32768, an online softmax, and a second read).
The backward pass is then the LM head's two GEMMs on that buffer, dh = G W and dW = G^T h, scaled
by the incoming gradient afterwards (a [T, D] and a [V, D] tensor, not [T, V]).

Precision: as torch under autocast. The GEMM's logits are rounded to the autocast dtype (bf16)
and everything after is fp32; the gradient is rounded once to bf16, as torch rounds its
fp32 gradient to the logits' bf16. Softmax as exp(x − max) / Σ exp(x − max), multiplied by the
reciprocals of the sum and the count (blocked rows: exp(x − lse) / count), instead of torch's
exp(log_softmax(x)): the same value up to fp32 rounding, so an element of the bf16 gradient can
differ from torch's by one unit in the last place. The incoming gradient multiplies dh and dW
after their GEMMs (`scale_`, in fp32 and rounded once, as torch's `mul_`).
Labels equal to `IGNORE_INDEX` (-100, torch's) count for nothing; a label outside the
vocabulary makes the loss NaN (torch raises a device assertion instead).

Used by `upcycle.train.step.TrainStep` on one CUDA device with Triton; elsewhere the step takes
`F.linear` and `F.cross_entropy` (`reference`). tests/test_cross_entropy.py checks the kernel
through Triton's CPU interpreter against fp64 and, on the GPU, the step against the reference.

Shape letters: T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upcycle.kernels.swiglu import kernels, launch_device, triton_installed, triton_interpreted

IGNORE_INDEX = -100
# a vocabulary up to this size is read once into registers (32 values a thread at 32 warps);
# larger ones in blocks of it, twice
_MAX_BLOCK = 32768


def applies(x: torch.Tensor) -> bool:
    """Whether `linear_cross_entropy` takes the fused kernel for hidden states `x`."""
    return triton_installed() and (x.is_cuda or triton_interpreted())


def mean_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """torch's mean cross-entropy over the label positions, in fp32 whatever the logits' dtype
    (`upcycle.train.losses.lm_loss`)."""
    return F.cross_entropy(logits_BSV.flatten(0, -2).float(), labels_BS.flatten(), ignore_index=IGNORE_INDEX)


def exact_rows_and_gradient(
    logits_TV: torch.Tensor, labels_T: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `cross_entropy_rows_` approximates, in fp64 from the stored logits: each row's loss
    (0 where ignored) and the gradient of Σ losses / count (0 on ignored rows). For tests and
    benchmarks; one [T, V] fp64 tensor besides the input."""
    log_TV = torch.log_softmax(logits_TV.double(), -1)
    kept_T = labels_T != IGNORE_INDEX
    picked_T = labels_T.clamp(min=0)
    rows_T = torch.where(kept_T, -log_TV.gather(1, picked_T[:, None])[:, 0], 0.0)
    grad_TV = log_TV.exp_()
    grad_TV[kept_T, picked_T[kept_T]] -= 1.0
    grad_TV[~kept_T] = 0.0
    return rows_T, grad_TV.div_(count.double())


def reference(x_BSD: torch.Tensor, w_VD: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """torch's computation: logits by `F.linear` (in the autocast dtype under autocast), then
    `mean_cross_entropy`."""
    return mean_cross_entropy(F.linear(x_BSD, w_VD), labels_BS)


def linear_cross_entropy(x_BSD: torch.Tensor, w_VD: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of logits x W^T against `labels_BS`, differentiable in x and W
    (module docstring). Under autocast the GEMM runs in the autocast dtype, as `F.linear` would."""
    if not applies(x_BSD):
        return reference(x_BSD, w_VD, labels_BS)
    device_type = x_BSD.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_BSD.dtype
    return _LinearCrossEntropy.apply(x_BSD, w_VD, labels_BS, dtype)


def cross_entropy_rows_(
    logits_TV: torch.Tensor,
    labels_T: torch.Tensor,
    count: torch.Tensor,
    block: int | None = None,
    warps: int | None = None,
) -> torch.Tensor:
    """Per-row losses [T] (fp32; 0 where ignored); the logits overwritten by the gradient of
    Σ losses / count. `count`: one value on the device (no host synchronisation). `block` and
    `warps` override the launch configuration (a power of two; bench/cross_entropy.py compares
    them)."""
    T, V = logits_TV.shape
    losses_T = torch.empty(T, dtype=torch.float32, device=logits_TV.device)
    if T == 0:
        return losses_T
    if logits_TV.stride(1) != 1:
        raise ValueError("cross_entropy_rows_: the logits' rows must be contiguous")
    block = block or min(_MAX_BLOCK, max(16, 1 << (V - 1).bit_length()))
    warps = warps or min(32, max(4, block // 1024))
    tk = kernels()
    with launch_device(logits_TV):
        tk.cross_entropy_kernel[(T,)](
            logits_TV, labels_T.contiguous(), count, losses_T, V, logits_TV.stride(0), IGNORE_INDEX,
            BLOCK=block, NUM_BLOCKS=tk.triton.cdiv(V, block), num_warps=warps,
        )  # fmt: skip
    return losses_T


def scale_(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`t *= s` in place for a one-element tensor `s` on `t`'s device: `t` times the fp32 `s`,
    computed in fp32 and rounded once to `t`'s dtype, in one vectorised pass.

    That is what torch's `mul_` computes on the CPU (the fallback here). On a GPU, torch's `mul_`
    of a bf16 tensor by a 0-dim fp32 GPU tensor first rounds `s` to bf16 (so 1/3 becomes
    0.333984) and runs an unvectorised broadcasting kernel: 0.19 ms for the LM head's dx and dW in
    the Mixtral step (bench/RESULTS.md ninth round). The two agree whenever `s` is a bf16 number
    (1, 1/2, 1/4 ...: the usual loss scales); otherwise this pass is the closer to the exact
    product (tests/test_cross_entropy.py)."""
    if not (
        applies(t)
        and t.dtype in (torch.bfloat16, torch.float16, torch.float32)  # fp64: mul_ computes in fp64
        and t.is_contiguous()
        and s.numel() == 1
        and s.device == t.device
    ):
        return t.mul_(s)
    if t.numel():
        block = 4096
        with launch_device(t):
            kernels().scale_kernel[(kernels().triton.cdiv(t.numel(), block),)](
                t, s, t.numel(), BLOCK=block, num_warps=8
            )
    return t


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BSD, w_VD, labels_BS, dtype):
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1]).to(dtype)
        w = w_VD.to(dtype)
        labels_T = labels_BS.reshape(-1)
        with torch.autocast(x_BSD.device.type, enabled=False):
            g_TV = torch.mm(x_TD, w.t())  # the logits, then their gradient in place
        count = (labels_T != IGNORE_INDEX).sum().to(torch.float32)
        losses_T = cross_entropy_rows_(g_TV, labels_T, count)
        ctx.save_for_backward(x_TD, w, g_TV)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x_BSD.shape, x_BSD.dtype, w_VD.dtype
        return losses_T.sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x_TD, w, g_TV = ctx.saved_tensors
        dx = dw = None
        with torch.autocast(x_TD.device.type, enabled=False):
            # scaled after the cast to the input's dtype, in one pass (computed in fp32 either way)
            if ctx.needs_input_grad[0]:
                dx = scale_(torch.mm(g_TV, w).to(ctx.x_dtype), grad).view(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dw = scale_(torch.mm(g_TV.t(), x_TD).to(ctx.w_dtype), grad)
        return dx, dw, None, None
