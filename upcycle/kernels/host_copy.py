"""`HostCopy`: a small device tensor on its way to host memory, read later without a full stall.

On CUDA the copy goes into pinned memory with `non_blocking=True` on the tensor's current
stream, and an event recorded behind it; `tolist()` waits on that event only, so work queued
after the copy (the rest of a forward pass, an optimiser step) keeps the GPU busy while the host
reads. Used for the per-expert row counts that the MoE backward pass needs on the host
(`upcycle.kernels.grouped_moe`) and for the loss parts and gradient norm of a training step
(`upcycle.train.step`), which is then this step's only host synchronisation.

Elsewhere (CPU) the copy is a plain snapshot of the values.
"""

from __future__ import annotations

import torch


def page_locked(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in page-locked memory when it is a pageable host tensor bound for a CUDA `device`
    (a copy from pageable memory first waits for everything queued on the stream), else `t`."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        return t.pin_memory()
    return t


class HostCopy:
    """A copy of `t` (detached) that reaches host memory without blocking the caller."""

    def __init__(self, t: torch.Tensor) -> None:
        t = t.detach()
        self.ready: torch.cuda.Event | None = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.ready = torch.cuda.Event()
            # on the stream the copy ran on: that of the tensor's device, not the current device
            self.ready.record(torch.cuda.current_stream(t.device))
        else:
            self.host = t.to("cpu", copy=True)

    def tolist(self) -> list:
        """The values as Python numbers; waits for the copy (and only for it) on CUDA."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
