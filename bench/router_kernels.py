"""The fp32 router's three Triton kernels alone (`upcycle.kernels.router_gemm`): launch shapes
against the bf16-part GEMMs and the plain upcast fp32 GEMM, at one router shape.

A router of E experts over D features and T tokens computes fp32 logits x W^T ([T, E]), and in
backward dL/dx = g W (bf16, [T, D]) and dL/dW = g^T x ([E, D]). Each kernel reads or writes x
once (T·D·2 bytes), which is the ideal the table's last column measures against. Every kernel row
is checked against fp64: the logits and dL/dW within fp32's summation bound (K·2^-24·Σ|a||b| over
the K summed products), dL/dx within that plus one bf16 unit of its value. Kernel rows set the
module's launch constants (`_LOGITS_TILE`, `_LOGITS_BLOCK_D`, `_LOGITS_WARPS`, `_DX_BLOCK_T`,
`_DX_BLOCK_D`, `_DX_WARPS`, `_DW_TILE`, `_DW_BLOCK_D`, `_CHUNK`, `_DW_WARPS`) for the call, the
first row of each kernel being the module's own. The router rows time forward and backward
through the custom operator: on the fp32 kernels, on the bf16 parts (`FP32_KERNEL_MAX_EXPERTS =
0`, GPU only: it needs cuBLAS's bf16 GEMM with an fp32 output) and as the upcast fp32 GEMM with
autograd. Every row is timed as the graphed training step runs it: 20 calls in one CUDA graph
(`benchlib.time_graphed`), so a launch from Python is not in the figure. `--best PATH` writes
the fastest passing launch constants of each kernel as JSON (for a step run with them set).

Usage (GPU):  python bench/router_kernels.py [--tokens 16384] [--dim 1024] [--experts 8] [--json PATH]
              (the Mixtral-shaped step's router; the attention experts': --tokens 8192 --dim 4096
              --experts 4)
CPU smoke:    python bench/router_kernels.py --cpu-smoke   (Triton's interpreter, tiny, figures
              mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    H100_BANDWIDTH_TBS,
    device_name,
    module_constants,
    run_header,
    time_graphed,
    write_rows,
)

# launch shapes tried beside the module's own: (kernel, {constant: value})
VARIANTS = [
    ("logits", {"_LOGITS_BLOCK_D": 128}),
    ("logits", {"_LOGITS_TILE": 16384, "_LOGITS_WARPS": 8}),
    ("dx", {"_DX_BLOCK_T": 8}),
    ("dw", {"_CHUNK": 128}),
    ("dw", {"_DW_TILE": 2048, "_DW_WARPS": 1}),
    ("dw", {"_DW_TILE": 2048, "_DW_WARPS": 2}),
    ("dw", {"_DW_TILE": 4096, "_DW_WARPS": 2}),
    ("dw", {"_DW_TILE": 4096, "_DW_BLOCK_D": 128, "_DW_WARPS": 2}),
    ("dw", {"_DW_TILE": 2048, "_DW_WARPS": 1, "_CHUNK": 128}),
]
SMOKE_VARIANTS = [
    ("logits", {"_LOGITS_TILE": 2048, "_LOGITS_BLOCK_D": 64}),
    ("dx", {"_DX_BLOCK_T": 8, "_DX_BLOCK_D": 64}),
    ("dw", {"_CHUNK": 64}),
]


@dataclass
class Row:
    name: str
    ms: float
    tb_per_s: float
    excess: float  # the largest error ÷ its bound (≤ 1: within it)
    ok: bool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--best", type=Path, help="write the fastest passing constants of each kernel here")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tokens, args.dim, args.experts, args.steps = 200, 96, 8, 1
    variants = SMOKE_VARIANTS if args.cpu_smoke else VARIANTS
    from upcycle.kernels import router_gemm as rg

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    T, D, E = args.tokens, args.dim, args.experts
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, D, device=device, generator=generator).to(torch.bfloat16)
    w = torch.randn(E, D, device=device, generator=generator) * D**-0.5
    g = torch.randn(T, E, device=device, generator=generator) * 1e-4  # a logit gradient's scale
    x64, w64, g64 = x.double(), w.double(), g.double()
    u = 2.0**-24
    expected = {
        "logits": (x64 @ w64.t(), D * u * (x64.abs() @ w64.abs().t())),
        "dx": (
            g64 @ w64,
            E * u * (g64.abs() @ w64.abs()) + torch.finfo(torch.bfloat16).eps * (g64 @ w64).abs(),
        ),
        "dw": (g64.t() @ x64, T * u * (g64.abs().t() @ x64.abs())),
    }
    kernels = {
        "logits": lambda: rg._logits_fp32(x, w),
        "dx": lambda: rg._dx_fp32(g, w, torch.bfloat16),
        "dw": lambda: rg._dw_fp32(g, x, torch.float32),
    }
    bytes_moved = T * D * x.element_size()

    rows = []
    fastest: dict[str, tuple[float, dict[str, object]]] = {}
    for kernel, values in [(k, {}) for k in kernels] + variants:
        with module_constants(rg, values):
            got = kernels[kernel]().double()
            ms = statistics.median(time_graphed(kernels[kernel], device, 3, args.steps))
        exact, bound = expected[kernel]
        excess = float(((got - exact).abs() / bound.clamp_min(1e-300)).max())
        label = (
            ", ".join(f"{name.strip('_').lower()} {value}" for name, value in values.items()) or "module's"
        )
        rows.append(Row(f"{kernel} ({label})", ms, bytes_moved / (ms * 1e-3) / 1e12, excess, excess <= 1.0))
        if excess <= 1.0 and ms < fastest.get(kernel, (float("inf"), {}))[0]:
            fastest[kernel] = (ms, values)

    def router(x_: torch.Tensor, w_: torch.Tensor) -> None:
        x_ = x_.detach().requires_grad_()
        w_ = w_.detach().requires_grad_()
        rg.router_logits(x_, w_).backward(g)

    def upcast(x_: torch.Tensor, w_: torch.Tensor) -> None:
        x_ = x_.detach().requires_grad_()
        w_ = w_.detach().requires_grad_()
        (x_.float() @ w_.t()).backward(g)

    routers = [("router fwd+bwd, fp32 kernels", router, {})]
    if device.type == "cuda":
        routers.append(("router fwd+bwd, bf16 parts", router, {"FP32_KERNEL_MAX_EXPERTS": 0}))
    routers.append(("router fwd+bwd, upcast fp32 GEMM", upcast, {}))
    for name, fn, values in routers:
        with module_constants(rg, values):
            ms = statistics.median(time_graphed(lambda fn=fn: fn(x, w), device, 3, args.steps))
        rows.append(Row(name, ms, 3 * bytes_moved / (ms * 1e-3) / 1e12, 0.0, True))

    print(run_header(device_name(device)))
    print(f"T {T}, D {D}, E {E}: x is {bytes_moved / 1e6:.1f} MB (bf16); the router rows move it three times")
    print("| kernel (launch shape) | ms | TB/s (x once) | of 3.35 TB/s | max error ÷ bound | check |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.ms:.4f} | {r.tb_per_s:.2f} | {r.tb_per_s / H100_BANDWIDTH_TBS:.0%} | "
              f"{r.excess:.2f} | {'ok' if r.ok else 'MISMATCH'} |")  # fmt: skip
    if args.json:
        write_rows(args.json, device, rows)
    if args.best:
        best = {name: value for _, values in fastest.values() for name, value in values.items()}
        args.best.write_text(json.dumps(best, indent=1))
        print(f"fastest launch constants: {best or 'the module defaults'}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
