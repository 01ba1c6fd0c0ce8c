"""SwiGLU between the two grouped GEMMs of the expert path: one pass forward, one pass backward.

Used by `upcycle.kernels.grouped_moe` for gated SiLU experts (Mixtral, Llama, Qwen). With
h = [gate | up] (rows of width 2F, gate columns first), w a per-row combine weight and
d the gradient arriving at the expert output *before* the combine weight is applied:

    forward:   a = silu(gate) ⊙ up
    backward:  dw   = Σ_f d ⊙ a                       (the combine weight's gradient, fp32)
               da   = w · d
               dh   = [da ⊙ up ⊙ σ(gate)(1 + gate(1 − σ(gate))) | da ⊙ silu(gate)]
               a_w  = w · a                            (the down projection's weight-gradient input)

so the backward pass recomputes `a` from `h` instead of keeping it, and produces in one read of h
and d everything the two weight-gradient GEMMs and the input-gradient GEMM need. Unfused, the
same work is a chain of element-wise kernels that each read and write A×F or A×2F tensors
(perf.md: the glue between the GEMMs is what separates the grouped path from a dense layer).

Two implementations of each function, one result:
- Triton kernels (`*_triton`) on CUDA tensors in eager mode, when Triton is importable; the
  arithmetic runs in fp32 registers and rounds once on store.
- torch expressions (`*_torch`) everywhere else: CPU, fp64, and under `torch.compile`, where
  inductor fuses them itself. They compute in fp32 (fp64 stays fp64).
tests/test_swiglu.py checks both against an fp64 reference (the Triton kernels through Triton's
CPU interpreter when no GPU is present, and on the GPU machine).

Shape letters: A rows (expert assignments), F expert width.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported (it is imported only when a kernel first runs)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton's CPU interpreter is on (`TRITON_INTERPRET=1`, the tests): kernels then run
    on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels():
    """The module of Triton kernels, imported on first use."""
    from upcycle.kernels import triton_kernels

    return triton_kernels


_BLOCK_F = 1024


def use_triton(h_A2F: torch.Tensor) -> bool:
    """True where the Triton kernels run: eager mode, CUDA, a float dtype Triton stores."""
    return (
        not torch.compiler.is_compiling()
        and h_A2F.is_cuda
        and triton_installed()
        and h_A2F.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- torch versions


def swiglu_forward_torch(h_A2F: torch.Tensor) -> torch.Tensor:
    gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate_AF) * up_AF


def swiglu_backward_torch(
    h_A2F: torch.Tensor, d_AF: torch.Tensor, w_A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh_A2F, dw_A, a_w_AF) as in the module docstring; dw_A in fp32 (fp64 for fp64)."""
    compute = _compute_dtype(h_A2F.dtype)
    gate_AF, up_AF = (t.to(compute) for t in h_A2F.chunk(2, dim=-1))
    sigmoid_AF = torch.sigmoid(gate_AF)
    silu_AF = gate_AF * sigmoid_AF
    a_AF = silu_AF * up_AF
    d_AF = d_AF.to(compute)
    w_A1 = w_A.to(compute)[:, None]
    dw_A = (d_AF * a_AF).sum(dim=-1)
    da_AF = d_AF * w_A1
    dgate_AF = da_AF * up_AF * sigmoid_AF * (1 + gate_AF * (1 - sigmoid_AF))
    dh_A2F = torch.cat([dgate_AF, da_AF * silu_AF], dim=-1).to(h_A2F.dtype)
    return dh_A2F, dw_A, (a_AF * w_A1).to(h_A2F.dtype)


# ----------------------------------------------------------------------------- Triton versions


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device and stream; make that the device of `t`
    (a model on cuda:1 while cuda:0 is current). CPU tensors (the interpreter): nothing to do."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` with unit column stride (the kernels index rows by stride, columns densely)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_forward_triton(h_A2F: torch.Tensor) -> torch.Tensor:
    h_A2F = unit_stride_rows(h_A2F)
    A, F2 = h_A2F.shape
    F = F2 // 2
    a_AF = torch.empty(A, F, dtype=h_A2F.dtype, device=h_A2F.device)
    if A:
        tk = kernels()
        block = min(_BLOCK_F, tk.triton.next_power_of_2(F))
        with launch_device(h_A2F):
            tk.swiglu_forward_kernel[(A, tk.triton.cdiv(F, block))](
                h_A2F, a_AF, F, h_A2F.stride(0), a_AF.stride(0), BLOCK=block
            )
    return a_AF


def swiglu_backward_triton(
    h_A2F: torch.Tensor, d_AF: torch.Tensor, w_A: torch.Tensor, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`in_place`: write dh over h and a·w over d (each element is read before it is written,
    by the same program), so the backward pass allocates neither; the caller gives up h and d."""
    if in_place and not (h_A2F.is_contiguous() and d_AF.is_contiguous()):
        raise ValueError("swiglu_backward_triton(in_place=True) needs contiguous h and d")
    h_A2F, d_AF, w_A = unit_stride_rows(h_A2F), unit_stride_rows(d_AF), w_A.contiguous()
    A, F2 = h_A2F.shape
    F = F2 // 2
    dh_A2F = h_A2F if in_place else torch.empty_like(h_A2F)
    dw_A = torch.empty(A, dtype=torch.float32, device=h_A2F.device)
    aw_AF = d_AF if in_place else torch.empty(A, F, dtype=h_A2F.dtype, device=h_A2F.device)
    if A:
        tk = kernels()
        block = min(_BLOCK_F, tk.triton.next_power_of_2(F))
        with launch_device(h_A2F):
            tk.swiglu_backward_kernel[(A,)](
                h_A2F, d_AF, w_A, dh_A2F, dw_A, aw_AF, F,
                h_A2F.stride(0), d_AF.stride(0), dh_A2F.stride(0), aw_AF.stride(0),
                BLOCK=block, NUM_BLOCKS=tk.triton.cdiv(F, block),
            )  # fmt: skip
    return dh_A2F, dw_A, aw_AF


# ----------------------------------------------------------------------------- dispatch


def swiglu_forward(h_A2F: torch.Tensor) -> torch.Tensor:
    return swiglu_forward_triton(h_A2F) if use_triton(h_A2F) else swiglu_forward_torch(h_A2F)


def swiglu_backward(
    h_A2F: torch.Tensor, d_AF: torch.Tensor, w_A: torch.Tensor, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh_A2F, dw_A, a_w_AF). `in_place` lets the Triton kernel reuse the memory of h and d for
    dh and a·w (the torch version always allocates)."""
    if use_triton(h_A2F):
        return swiglu_backward_triton(h_A2F, d_AF, w_A, in_place=in_place)
    return swiglu_backward_torch(h_A2F, d_AF, w_A)
