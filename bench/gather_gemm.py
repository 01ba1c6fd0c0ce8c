"""The gathered grouped GEMMs (upcycle/kernels/gather_gemm.py) against gather + torch._grouped_mm.

For a shape of bench/moe_layer.py (tokens routed at random, so expert loads vary as in training),
each GEMM of the expert path that reads gathered token rows is timed both ways:

- fwd gate_up:   x[token] @ W_in[e]^T          (index_select + grouped_mm, or one gathered GEMM)
- dgrad down:    g[token] @ W_down[e]          (the output gradient gathered)
- wgrad down:    Σ g[token]^T (w·a)            (gather counted in dgrad down on the baseline side,
                                                where the gathered copy is shared)
- wgrad gate_up: Σ dh^T x[token]               (x gathered again)

`--tiles` sweeps the kernels' tile configurations (BM/BN/BK or BN/BK/BR, warps, stages): the
next GPU session uses it to pick defaults before turning `grouped_moe.GATHER_GEMM` on. Every
timed result is checked against the baseline's (relative error). TFLOP/s = 2·M·N·K / time.

Usage (GPU):  python bench/gather_gemm.py [--shapes S2 S1 S3] [--tiles 128,128,64,8,3 ...] [--json PATH]
CPU smoke (a test, under TRITON_INTERPRET=1):  python bench/gather_gemm.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import relative_error, run_header, time_calls

from upcycle.kernels import gather_gemm

SHAPES = {  # D, F, E, K, T as bench/moe_layer.py
    "S1": (4096, 14336, 8, 2, 8192),
    "S2": (2048, 1024, 64, 8, 16384),
    "S3": (2048, 8192, 8, 2, 16384),
}
SMOKE_SHAPES = {"tiny": (32, 16, 4, 2, 24)}
DEFAULT_TILES = ["128,128,64,8,3", "128,256,64,8,3", "64,128,64,4,4", "128,128,32,4,4"]


def routed(D: int, F: int, E: int, K: int, T: int, device: torch.device, dtype: torch.dtype):
    generator = torch.Generator(device=device).manual_seed(E + K)  # drawn on the GPU: S1 is 2G values
    indices = torch.randn(T, E, generator=generator, device=device).topk(K, dim=-1).indices.reshape(-1)
    order = torch.argsort(indices, stable=True)
    token = torch.div(order, K, rounding_mode="floor")
    offsets = torch.bincount(indices, minlength=E).cumsum(0).to(torch.int32)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator, device=device) * 0.02).to(dtype)

    return (
        token,
        offsets,
        rand(T, D),
        rand(T, D),
        rand(T * K, F),
        rand(T * K, 2 * F),
        rand(E, 2 * F, D),
        rand(E, D, F),
    )


def cases(D: int, F: int, E: int, K: int, T: int, device: torch.device, dtype: torch.dtype):
    """(name, M, N, Kred, baseline call, gathered call) for the four GEMMs that read gathered rows."""
    token, offs, x, g, aw, dh, w_in, w_down = routed(D, F, E, K, T, device, dtype)
    A = T * K
    gm = torch._grouped_mm
    g_AD = g.index_select(0, token)  # shared by the baseline's dgrad and wgrad of the down projection
    return [
        ("fwd gate_up", A, 2 * F, D, lambda: gm(x.index_select(0, token), w_in.transpose(-2, -1), offs=offs),
         lambda: gather_gemm.gather_grouped_mm(x, token, w_in, offs, "nk")),
        ("dgrad down", A, F, D, lambda: gm(g.index_select(0, token), w_down, offs=offs),
         lambda: gather_gemm.gather_grouped_mm(g, token, w_down, offs, "kn")),
        ("wgrad down", D, F, A, lambda: gm(g_AD.t(), aw, offs=offs),
         lambda: gather_gemm.gather_grouped_wgrad(g, token, aw, None, offs)),
        ("wgrad gate_up", 2 * F, D, A, lambda: gm(dh.t(), x.index_select(0, token), offs=offs),
         lambda: gather_gemm.gather_grouped_wgrad(dh, None, x, token, offs)),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["S2", "S1", "S3"], choices=list(SHAPES))
    parser.add_argument("--tiles", nargs="+", default=DEFAULT_TILES, help="BM,BN,BK,warps,stages")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="a tiny shape on the CPU (Triton's interpreter)"
    )
    args = parser.parse_args(argv)
    shapes, dtype = SHAPES, torch.bfloat16
    if args.cpu_smoke:
        device, shapes, args.shapes, args.steps, dtype = (
            torch.device("cpu"),
            SMOKE_SHAPES,
            ["tiny"],
            1,
            torch.float32,
        )
        args.tiles = ["16,16,16,4,1"]
    elif not torch.cuda.is_available():
        print("gather_gemm: needs a CUDA GPU (or --cpu-smoke under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    print(run_header(torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"))
    print(
        "| shape | GEMM | M | N | K | tiles | gather + grouped_mm TFLOP/s | gathered GEMM TFLOP/s | speed-up | rel. err. |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.shapes:
        for name, M, N, Kr, baseline, gathered in cases(*shapes[shape], device, dtype):
            flops = 2 * M * N * Kr
            expected = baseline()
            t_base = statistics.median(time_calls(baseline, device, 1, args.steps))
            for spec in args.tiles:
                gather_gemm.set_tiles(spec)
                try:
                    error = relative_error(gathered(), expected)
                    t_fused = statistics.median(time_calls(gathered, device, 1, args.steps))
                except Exception as failure:  # a tile config the GPU cannot run: report, go on
                    print(
                        f"| {shape} | {name} | {M} | {N} | {Kr} | {spec} | failed: {type(failure).__name__} |"
                    )
                    continue
                row = dict(shape=shape, gemm=name, M=M, N=N, K=Kr, tiles=spec, error=error,
                           baseline_tflops=flops / t_base / 1e9, gathered_tflops=flops / t_fused / 1e9)  # fmt: skip
                rows.append(row)
                if args.json:  # after every row: a run cut short by its time limit keeps what it measured
                    partial = args.json.with_suffix(".partial")
                    partial.write_text(json.dumps(rows, indent=1))
                    partial.replace(args.json)
                print(
                    f"| {shape} | {name} | {M} | {N} | {Kr} | {spec} | {row['baseline_tflops']:.0f} | "
                    f"{row['gathered_tflops']:.0f} | {t_base / t_fused:.2f} | {error:.1e} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
