"""The six GEMMs of one MoE layer step, grouped (`torch._grouped_mm`) against one dense GEMM.

For a shape of bench/moe_layer.py (A = T·K rows spread evenly over E experts), each GEMM of the
grouped expert path is timed alone, beside a plain `torch.mm` with the same M, N, K (the same
FLOPs without the grouping):

- fwd gate_up: [A, D] × [E, D, 2F] -> [A, 2F];   fwd down: [A, F] × [E, F, D] -> [A, D]
- dgrad of each (the same kind of call with the weights transposed)
- wgrad of each: [D, A] × [A, 2F] -> [E, D, 2F] with offsets on the reduced dimension

Backends: `cutlass` is `torch._grouped_mm` as called eagerly (what upcycle's grouped path runs);
`inductor` is the same call under `torch.compile(mode="max-autotune-no-cudagraphs")`, which lets
inductor pick among its Triton grouped-GEMM templates and the ATen kernel (autotuning time is
reported apart). TFLOP/s = 2·M·N·K / time; median of `--steps` CUDA-event-timed calls.

Usage (GPU):  python bench/grouped_gemm.py [--shapes S1 S2 S3] [--no-autotune] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import run_header, time_calls

SHAPES = {  # D, F, E, K, T as bench/moe_layer.py
    "S1": (4096, 14336, 8, 2, 8192),
    "S2": (2048, 1024, 64, 8, 16384),
    "S3": (2048, 8192, 8, 2, 16384),
}
SMOKE_SHAPES = {"tiny": (64, 32, 4, 2, 64)}


def median_ms(fn, device: torch.device, steps: int, warmup: int = 3) -> float:
    return statistics.median(time_calls(fn, device, warmup, steps))


def gemms(D: int, F: int, E: int, K: int, T: int, device: torch.device):
    """(name, M, N, Kred, grouped call, dense call) for the six GEMMs of one layer step."""
    A = T * K
    dt = torch.bfloat16
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * (A // E)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dt) * 0.02

    x_AD, h_AF, g_A2F, g_AD = rand(A, D), rand(A, F), rand(A, 2 * F), rand(A, D)
    w_in_E2FD, w_down_EDF = rand(E, 2 * F, D), rand(E, D, F)
    dense_in, dense_down = rand(2 * F, D), rand(D, F)
    gm = torch._grouped_mm
    return [
        (
            "fwd gate_up",
            A,
            2 * F,
            D,
            lambda: gm(x_AD, w_in_E2FD.transpose(-2, -1), offs=offs),
            lambda: torch.mm(x_AD, dense_in.t()),
        ),
        (
            "fwd down",
            A,
            D,
            F,
            lambda: gm(h_AF, w_down_EDF.transpose(-2, -1), offs=offs),
            lambda: torch.mm(h_AF, dense_down.t()),
        ),
        ("dgrad down", A, F, D, lambda: gm(g_AD, w_down_EDF, offs=offs), lambda: torch.mm(g_AD, dense_down)),
        (
            "dgrad gate_up",
            A,
            D,
            2 * F,
            lambda: gm(g_A2F, w_in_E2FD, offs=offs),
            lambda: torch.mm(g_A2F, dense_in),
        ),
        ("wgrad down", D, F, A, lambda: gm(g_AD.t(), h_AF, offs=offs), lambda: torch.mm(g_AD.t(), h_AF)),
        (
            "wgrad gate_up",
            2 * F,
            D,
            A,
            lambda: gm(g_A2F.t(), x_AD, offs=offs),
            lambda: torch.mm(g_A2F.t(), x_AD),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--no-autotune", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny shape on the CPU (a test)")
    args = parser.parse_args(argv)
    shapes = SHAPES
    if args.cpu_smoke:
        device, shapes, args.shapes, args.steps, args.no_autotune = (
            torch.device("cpu"),
            SMOKE_SHAPES,
            ["tiny"],
            2,
            True,
        )
    elif not torch.cuda.is_available():
        print("grouped_gemm: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    rows = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(run_header(name))
    print(
        "| shape | GEMM | M | N | K | dense mm TFLOP/s | grouped (cutlass) | ratio | inductor autotuned | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for name, M, N, Kr, grouped, dense in gemms(*shapes[shape], device):
            flops = 2 * M * N * Kr
            t_dense, t_grouped = median_ms(dense, device, args.steps), median_ms(grouped, device, args.steps)
            t_tuned = tune_s = None
            if not args.no_autotune:
                tuned = torch.compile(grouped, mode="max-autotune-no-cudagraphs", dynamic=False)
                start = time.perf_counter()
                try:
                    tuned()
                    torch.cuda.synchronize()
                    tune_s = time.perf_counter() - start
                    t_tuned = median_ms(tuned, device, args.steps)
                except Exception as error:  # report and go on
                    print(f"  inductor failed on {shape} {name}: {type(error).__name__}: {error}"[:300])
            row = {
                "shape": shape,
                "gemm": name,
                "M": M,
                "N": N,
                "K": Kr,
                "dense_tflops": flops / t_dense / 1e9,
                "grouped_tflops": flops / t_grouped / 1e9,
                "tuned_tflops": None if t_tuned is None else flops / t_tuned / 1e9,
                "tune_s": tune_s,
            }
            rows.append(row)
            tuned_text = "n/a" if t_tuned is None else f"{row['tuned_tflops']:.0f} ({tune_s:.0f} s tuning)"
            tuned_ratio = "n/a" if t_tuned is None else f"{t_dense / t_tuned:.2f}"
            print(
                f"| {shape} | {name} | {M} | {N} | {Kr} | {row['dense_tflops']:.0f} | "
                f"{row['grouped_tflops']:.0f} | {t_dense / t_grouped:.2f} | {tuned_text} | {tuned_ratio} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
