"""The AdamW step alone: torch's fused AdamW against upcycle's (`upcycle.train.optim.AdamW`); and
the gradient norm that clipping computes before it: torch's `get_total_norm` against
`upcycle.kernels.grad_norm.total_norm`, each compared with fp64's norm.

The parameters are those of bench/train_step.py's Mixtral-shaped model (640M), in the trainer's
two groups (decayed and not), with the `grad_scale` and `found_inf` tensors that
`upcycle.train.TrainStep` hands a fused AdamW (clipping folded into the step, a device-side
guard). Gradients are random. Each implementation is set to the same weights, moments and step
count (those of a run at step 4); after one step, the weights are compared: the largest
difference over one rounding of the stored value plus fp32's error on the weight (at most 1 when
both computed the same update). Bandwidth counts the bytes AdamW must move: read weight, gradient
and both moments, write weight and both moments (14 bytes a parameter in bf16, 28 in fp32). A
device copy of 2 GiB gives the card's reachable bandwidth in the same run.

Usage (GPU):  python bench/optimizer_step.py [--precision bf16-weights|fp32] [--steps 20] [--json PATH]
CPU smoke:    python bench/optimizer_step.py --cpu-smoke   (tiny model, figures mean nothing)
"""

from __future__ import annotations

import argparse
import math
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
    fmt,
    load_script,
    module_constants,
    run_header,
    time_calls,
    time_graphed,
    write_rows,
)

from upcycle.kernels import grad_norm
from upcycle.model import Transformer
from upcycle.train.build import cast_to_bf16_weights
from upcycle.train.config import OptimizerConfig
from upcycle.train.optim import AdamW, build_optimizer

# the gradient norm's launch shapes: the module's, then variants (label, {constant: value})
NORM_VARIANTS = [
    ("(module's)", {}),
    ("(small tensors by _foreach_norm)", {"_CAT_FRACTION": 0.0}),
    ("(iters 4)", {"_ITERS": 4}),
    ("(block 8192, iters 4, warps 16)", {"_BLOCK": 8192, "_ITERS": 4, "_WARPS": 16}),
]


@dataclass
class Row:
    name: str
    ms: float
    tb_per_s: float
    of_peak: float
    max_ulps: float
    ok: bool


def model_parameters(precision: str, tiny: bool, device: torch.device) -> list[torch.nn.Parameter]:
    configs = load_script("train_step").case_configs(tiny)
    with torch.device(device):
        model = Transformer(configs["mixtral"])
    if precision == "bf16-weights":
        cast_to_bf16_weights(model)
    return list(model.parameters())


def rounding_excess(a: torch.Tensor, b: torch.Tensor, before: torch.Tensor) -> float:
    """max |a − b| over what two fp32 computations of one update may differ by once stored:
    one last place of the stored value, plus fp32's own error on a weight the size of `before`
    (where the update cancels most of a weight, the result's last place is finer than that)."""
    eps = torch.finfo(a.dtype).eps
    a, b, before = (t.detach().double() for t in (a, b, before))
    tolerance = eps * torch.maximum(a.abs(), b.abs()) + 8 * torch.finfo(torch.float32).eps * before.abs()
    return float(((a - b).abs() / tolerance.clamp_min(torch.finfo(torch.float32).tiny)).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["bf16-weights", "fp32"], default="bf16-weights")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    steps, warmup = (2, 1) if args.cpu_smoke else (args.steps, args.warmup)
    config = OptimizerConfig(lr=1e-4)

    start = model_parameters(args.precision, args.cpu_smoke, device)
    numel = sum(p.numel() for p in start)
    bytes_moved = sum(7 * p.numel() * p.element_size() for p in start)
    generator = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(p.shape, device=device, generator=generator).to(p.dtype) * 1e-3 for p in start]
    # the compared step starts from moments of a run in progress (from zero moments at step 1 the
    # betas cancel out of the update, and a mistake in them would not show)
    moments = [
        (torch.randn(p.shape, device=device, generator=generator).to(p.dtype) * 1e-3,
         (torch.randn(p.shape, device=device, generator=generator) * 1e-3).square().to(p.dtype))
        for p in start
    ]  # fmt: skip

    def make(kind: str):
        params = [torch.nn.Parameter(p.detach().clone()) for p in start]
        holder = torch.nn.Module()
        holder.params = torch.nn.ParameterList(params)
        if kind == "torch fused AdamW":
            groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
            optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                          fused=device.type == "cuda" or None)  # fmt: skip
        else:
            optimizer = build_optimizer(holder, config, device)
            assert device.type == "cpu" or type(optimizer) is AdamW
        if device.type == "cuda":
            optimizer.grad_scale = torch.ones((), device=device)
            optimizer.found_inf = torch.zeros((), device=device)

        def step() -> None:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone() if device.type == "cpu" else g  # torch's kernel rescales in place
            optimizer.step()

        def resume() -> None:
            """Weights back to the start, moments and step counts those of step 4."""
            for p, begin, (m, v) in zip(params, start, moments, strict=True):
                p.data.copy_(begin)
                state = optimizer.state[p]
                state["exp_avg"].copy_(m), state["exp_avg_sq"].copy_(v), state["step"].fill_(4.0)

        return params, step, resume

    rows, after = [], {}
    for kind in ("torch fused AdamW", "upcycle AdamW"):
        params, step, resume = make(kind)
        step()  # creates the state
        resume()
        step()
        after[kind] = [p.detach().clone() for p in params]
        ms = statistics.median(time_calls(step, device, warmup, steps))
        tbs = bytes_moved / (ms * 1e-3) / 1e12
        rows.append(Row(kind, ms, tbs, tbs / H100_BANDWIDTH_TBS, 0.0, True))
        del params, step, resume
    pairs = zip(after["torch fused AdamW"], after["upcycle AdamW"], start, strict=True)
    worst = max(rounding_excess(a, b, before.to(a.dtype)) for a, b, before in pairs)
    rows[1].max_ulps = worst
    rows[1].ok = worst <= 1.0

    # the gradient norm before it (clipping): torch's get_total_norm against upcycle's pass (with
    # launch-shape variants), each graphed as in the training step
    exact = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    norms = [("gradient norm: torch get_total_norm", lambda: torch.nn.utils.get_total_norm(grads), {})]
    if grad_norm.supports(grads):  # not on the CPU without Triton's interpreter
        norms += [(f"gradient norm: upcycle total_norm {label}", lambda: grad_norm.total_norm(grads), values)
                  for label, values in NORM_VARIANTS]  # fmt: skip
    for name, norm_of, values in norms:
        with module_constants(grad_norm, values):
            error = abs(norm_of().item() - exact)
            ms = statistics.median(time_graphed(norm_of, device, warmup, steps))
            # upcycle's must be within its fp32 summation bound; torch's rounds each tensor's
            # norm to the gradients' dtype, so it is shown, not checked
            ok = "torch" in name or error <= grad_norm.error_bound(grads)
        tbs = grad_bytes / (ms * 1e-3) / 1e12
        units = error / (exact * 2.0**-24)  # in fp32 roundings of the norm
        rows.append(Row(name, ms, tbs, tbs / H100_BANDWIDTH_TBS, units, ok))

    copy_src = torch.empty(1 << (20 if args.cpu_smoke else 30), dtype=torch.bfloat16, device=device)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = statistics.median(time_calls(lambda: copy_dst.copy_(copy_src), device, warmup, steps))
    copy_tbs = 2 * copy_src.numel() * 2 / (copy_ms * 1e-3) / 1e12
    rows.append(
        Row("device copy (read + write)", copy_ms, copy_tbs, copy_tbs / H100_BANDWIDTH_TBS, 0.0, True)
    )

    print(run_header(device_name(device)))
    print(f"{numel / 1e6:.1f}M parameters, {args.precision}, {bytes_moved / 1e9:.2f} GB moved per step")
    print(
        "| implementation | ms | TB/s | of 3.35 TB/s | AdamW: max Δ vs torch (÷ one rounding); norm: Δ vs fp64 (fp32 roundings) | check |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.ms:.3f} | {r.tb_per_s:.2f} | {r.of_peak:.0%} | {fmt(r.max_ulps, '.2f')} | "
              f"{'ok' if r.ok else 'MISMATCH'} |")  # fmt: skip
    if args.json:
        write_rows(args.json, device, rows, precision=args.precision)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
