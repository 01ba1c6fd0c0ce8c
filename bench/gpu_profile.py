"""Where the GPU time of one benchmark step goes: kernels and kernel classes under torch.profiler.

The evidence behind bench/RESULTS.md's speed findings (issue 8: "for anything missed the profile
evidence of where the time goes"). It builds one case exactly as the timing benchmark does,
runs warm-up steps, then profiles `--steps` steps and prints, per step:

- the total GPU kernel time and the wall time of the profiled steps;
- kernel time by class: GEMM (cuBLAS / CUTLASS / nvjet), grouped GEMM (CUTLASS grouped kernels
  behind `torch._grouped_mm`), attention (flash / cuDNN / efficient), Triton (inductor's
  fused kernels), copies and fills, reductions and sorting (index, scatter, sort, cumsum, ...),
  other element-wise kernels;
- the top kernels by time, with calls per step;
- on a GPU, the time the GPU sat idle between kernels, grouped by the host op that launched the
  kernel ending each gap (what the GPU waited for), and the host calls that synchronised;
- with `--host`, the host's side: the same steps again under cProfile (no torch profiler), the
  wall time per step, and the Python functions by self time per step. A host-bound step shows its
  launch work there; time spent waiting for the GPU shows as the self time of the call that
  synchronised (`.item()`, `.tolist()`, `synchronize`).

Cases:
- `moe S1|S2|S3`: `bench/moe_layer.py`'s ours grouped layer (add `--compile` for the compiled
  block), forward + backward; `dense S1|S2|S3`: its dense_ref of the same FLOPs.
- `attention dense|expert-KV|shared-KV`: `bench/attention_experts.py`'s blocks (wide MoA).
- `step mixtral|dense|btx4|hf-mixtral-bf16`: `bench/train_step.py`'s whole training step.

Usage (GPU):  python bench/gpu_profile.py moe S2 [--compile] [--steps 3] [--top 25] [--host] [--json PATH]
CPU smoke:    python bench/gpu_profile.py --cpu-smoke   (tiny shapes on the CPU, for the tests)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
for _path in (BENCH.parent, BENCH):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchlib import load_script  # noqa: E402

# Kernel classes, first match wins (kernel names of CUDA 12/13 libraries on Hopper).
# Inductor names its kernels after the ops they fuse (`triton_poi_fused__grouped_mm_mul_silu...`
# is element-wise glue next to a grouped GEMM, not a GEMM), so Triton comes first.
CLASSES: list[tuple[str, re.Pattern[str]]] = [
    ("Triton (fused)", re.compile(r"^triton_|^fused_", re.I)),
    ("grouped GEMM", re.compile(r"grouped|GroupProblemShape|ptr_array|PtrArray", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|cudnn|sdpa", re.I)),
    ("GEMM", re.compile(r"gemm|nvjet|sm90_xmma|cutlass|wgmma|cublas|matmul", re.I)),
    ("copy / fill", re.compile(r"copy|memcpy|memset|fill|cat|CatArray|contiguous", re.I)),
    (
        "index / scatter / sort / scan",
        re.compile(r"index|scatter|gather|sort|radix|scan|cumsum|topk|bitonic|segmented", re.I),
    ),
    ("reduction", re.compile(r"reduce|norm|softmax|sum|max|mean", re.I)),
]
OTHER = "element-wise / other"


def classify(name: str) -> str:
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return OTHER


@dataclass
class Profile:
    case: str
    steps: int
    wall_ms_per_step: float
    kernel_ms_per_step: float
    by_class: dict[str, float] = field(default_factory=dict)
    top: list[dict[str, object]] = field(default_factory=list)
    # GPU idle time inside the profiled window (GPU runs only): total, and by the host op that
    # launched the kernel ending each gap; host synchronisations by the op that made them.
    idle_ms_per_step: float | None = None
    idle_by_launcher: list[dict[str, object]] = field(default_factory=list)
    syncs: list[dict[str, object]] = field(default_factory=list)
    # `--host`: wall ms per step under cProfile alone, and Python functions by self time per step
    host_wall_ms_per_step: float | None = None
    host_top: list[dict[str, object]] = field(default_factory=list)
    # `--shapes`: device time by (kernel, the op that launched it, that op's input shapes)
    by_op_shape: list[dict[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class Span:
    """One GPU kernel (or host call) on the profiler's clock, in microseconds."""

    start: float
    end: float
    label: str


# CUDA runtime and driver calls that put work on a stream (kernel launches, copies, memsets).
RUNTIME_CALL = re.compile(r"^cu(da)?(Launch|Memcpy|Memset|GraphLaunch)")

# Host calls that wait for the GPU (a stall when the GPU still has work queued).
SYNC_CALL = re.compile(r"Synchronize|^cudaMemcpy$|^cudaMemcpy2D$|^cuMemcpyDtoH|^cudaStreamWaitEvent$")


def idle_gaps(kernels: list[Span], steps: int, top: int = 10) -> tuple[float, list[dict[str, object]]]:
    """GPU idle time (ms per step) between the first kernel's start and the last one's end, and
    that time grouped by the label of the kernel that ended each gap (who the GPU waited for)."""
    ordered = sorted(kernels, key=lambda span: span.start)
    idle: dict[str, float] = defaultdict(float)
    gaps: dict[str, int] = defaultdict(int)
    busy_until = ordered[0].end if ordered else 0.0
    for span in ordered[1:]:
        if span.start > busy_until:
            idle[span.label] += span.start - busy_until
            gaps[span.label] += 1
        busy_until = max(busy_until, span.end)
    total = sum(idle.values()) / 1000 / steps
    ranked = sorted(idle.items(), key=lambda item: -item[1])[:top]
    return total, [
        {"launched_by": label, "idle_ms": us / 1000 / steps, "gaps": gaps[label] / steps}
        for label, us in ranked
    ]


def op_label(event) -> str:
    """`top-level op > op` for a host event: where in the step (forward block, backward node,
    optimiser) and which op."""
    chain = []
    while event is not None:
        chain.append(event.name)
        event = event.cpu_parent
    leaf = chain[0] if not chain[0].startswith("cuda") or len(chain) == 1 else chain[1]
    return leaf if len(chain) <= 2 else f"{chain[-1][:60]} > {leaf[:60]}"


def linked_id(event) -> int:
    """The id of the framework op an event is linked to (0: none, or a torch that does not say)."""
    return getattr(event, "linked_correlation_id", 0)


def host_waits(events, steps: int) -> tuple[list[Span], list[dict[str, object]]]:
    """(kernel spans labelled by the host op that launched them, host synchronisations grouped
    by the op that made them) from a GPU profile's events."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    # How torch links them (torch.autograd.profiler's _parse_kineto_results): a kernel and the
    # runtime call that launched it (cudaLaunchKernel, cuLaunchKernelEx, a memcpy, ...) share
    # CUPTI's correlation id (each event's `id`), and both carry the id of the framework op that
    # made the call as `linked_correlation_id`. Framework op ids and CUPTI ids are separate
    # counters, so they collide: run G keyed kernels by every host event's id and put each gap
    # under CUPTI's "Activity Buffer Request"; fd928ea looked the linked id up among runtime calls'
    # ids and found none ("(unknown launcher)" in run H). Here a kernel finds its launch call by
    # its own id, else any runtime call with its linked id; the label is that call's parent op.
    runtime = [e for e in events if e.device_type == cpu and RUNTIME_CALL.match(e.name)]
    by_cupti_id = {e.id: e for e in runtime}
    # torch 2.11's FunctionEvent has no `linked_correlation_id` (2.13's has): only the CUPTI id links there
    by_op_id = {linked_id(e): e for e in runtime if linked_id(e) and e.cpu_parent}
    spans = []
    for e in events:
        if e.device_type == cuda and not getattr(e, "is_user_annotation", False):
            call = by_cupti_id.get(e.id)
            if call is None or call.cpu_parent is None:
                call = by_op_id.get(linked_id(e)) or call
            if call is None:
                label = "(unknown launcher)"
            else:
                label = (
                    op_label(call.cpu_parent) if call.cpu_parent is not None else f"{call.name} (top level)"
                )
            spans.append(Span(e.time_range.start, e.time_range.end, label))
    waits: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.device_type == cpu and SYNC_CALL.search(e.name):
            waits[f"{e.name} in {op_label(e.cpu_parent) if e.cpu_parent else '(top level)'}"].append(
                e.time_range.end - e.time_range.start
            )
    syncs = sorted(
        ({"call": k, "calls": len(v) / steps, "host_ms": sum(v) / 1000 / steps} for k, v in waits.items()),
        key=lambda row: -float(row["host_ms"]),
    )
    return spans, syncs


def moe_case(shape_name: str, dense: bool, compiled: bool, device: torch.device, smoke: bool):
    moe_layer = load_script("moe_layer")
    shapes = moe_layer.SMOKE_SHAPES if smoke else moe_layer.SHAPES
    shape = shapes[shape_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if dense:
        module = moe_layer.build_dense(shape, device, dtype)
        params, forward = list(module.parameters()), module
    else:
        weights = moe_layer.Weights.random(shape, device, dtype)
        module = moe_layer.build_ours(shape, weights, "grouped", device)
        if compiled:
            module = torch.compile(module, dynamic=False)
        params = weights.parameters()

        def forward(x, module=module):
            return module(x)[0]

    x = torch.randn(shape.T, shape.D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(shape.T, shape.D, device=device, dtype=dtype)

    def step() -> None:
        for param in params:
            param.grad = None
        x.grad = None
        forward(x).backward(g)

    return step


def attention_case(variant: str, compiled: bool, device: torch.device, smoke: bool):
    attention = load_script("attention_experts")
    case = attention.SMOKE_CASE if smoke else attention.GPU_CASE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    modules = attention.build_modules(case, device, dtype)
    module = modules[variant]
    if variant != "dense":
        module.implementation = "wide"
    call = torch.compile(module, dynamic=False) if compiled else module
    u = torch.randn(case.B, case.S, case.D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(case.B, case.S, case.D, device=device, dtype=dtype)
    cos, sin = attention.rope_tables(case, case.B, case.S, device, dtype)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        u.grad = None
        out = call(u, cos, sin, None)
        (out[0] if isinstance(out, tuple) else out).backward(g)

    return step


def step_case(case: str, compiled: bool, device: torch.device, smoke: bool, cuda_graph: bool = False):
    train_step = load_script("train_step")
    args = argparse.Namespace(
        compile=compiled, batch=2 if smoke else 8, seq_len=32 if smoke else 2048, cuda_graph=cuda_graph
    )
    config = train_step.case_configs(smoke)[case]
    _, runner = train_step.build_step(case, config, args, device)
    batches = train_step.random_batches(config, 1, args.batch, args.seq_len, device)
    counter = iter(range(1, 10**9))
    return lambda: runner(next(counter), [batches[0]])


def profile(step: Callable[[], object], device: torch.device, warmup: int, steps: int, top: int, case: str):
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = (time.perf_counter() - start) / steps * 1000
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if device.type == "cuda":
            # user annotations (`Optimizer.step#AdamW.step`, ...) span kernels already counted
            if event.device_type != torch.autograd.DeviceType.CUDA or getattr(
                event, "is_user_annotation", False
            ):
                continue
        elif event.cpu_parent is not None or not event.name.startswith("aten::"):
            continue
        duration = event.device_time if device.type == "cuda" else event.cpu_time
        totals[event.name] += duration / 1000 / steps
        calls[event.name] += 1
    kernel_ms = sum(totals.values())
    idle_ms, idle_by, syncs = None, [], []
    if device.type == "cuda":
        spans, syncs = host_waits(prof.events(), steps)
        idle_ms, idle_by = idle_gaps(spans, steps)
    by_class: dict[str, float] = defaultdict(float)
    for name, ms in totals.items():
        by_class[classify(name)] += ms
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return Profile(
        case=case,
        steps=steps,
        wall_ms_per_step=wall,
        kernel_ms_per_step=kernel_ms,
        by_class=dict(sorted(by_class.items(), key=lambda item: -item[1])),
        top=[
            {"kernel": name, "class": classify(name), "ms": ms, "calls": calls[name] / steps}
            for name, ms in ranked
        ],
        idle_ms_per_step=idle_ms,
        idle_by_launcher=idle_by,
        syncs=syncs[:10],
    )


def op_shape_profile(step: Callable[[], object], device: torch.device, steps: int, top: int):
    """The top (kernel, launching op, its input shapes) by device ms per step: which GEMM of the
    step is which (a replayed CUDA graph hides its ops, so profile the launched step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals: dict[tuple[str, str, str], float] = defaultdict(float)
    calls: dict[tuple[str, str, str], int] = defaultdict(int)
    for event in prof.events():
        for kernel in getattr(event, "kernels", []):
            key = (kernel.name, event.name, str(event.input_shapes))
            totals[key] += kernel.duration / 1000 / steps
            calls[key] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [
        {"kernel": k, "op": op, "shapes": shapes, "ms": ms, "calls": calls[(k, op, shapes)] / steps}
        for (k, op, shapes), ms in ranked
    ]


def host_profile(step: Callable[[], object], device: torch.device, steps: int, top: int):
    """(wall ms per step, the top Python functions by self time) of `steps` steps under cProfile.
    Built-in calls (a C function, a CUDA synchronisation) count as functions of their own, so a
    wait for the GPU is the self time of the call that waited."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler.disable()
    wall = (time.perf_counter() - start) / steps * 1000
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (prim calls, calls, self s, cum s, callers)
    rows = []
    for (filename, line, name), (_, ncalls, self_s, cum_s, _) in stats.items():
        where = name if filename == "~" else f"{name} ({Path(filename).name}:{line})"
        rows.append(
            {"function": where, "self_ms": self_s * 1000 / steps, "cum_ms": cum_s * 1000 / steps,
             "calls": ncalls / steps}
        )  # fmt: skip
    rows.sort(key=lambda row: -float(row["self_ms"]))
    return wall, rows[:top]


def report(result: Profile) -> list[str]:
    total = result.kernel_ms_per_step or 1.0
    lines = [
        f"## {result.case}: {result.kernel_ms_per_step:.2f} ms of kernels per step "
        f"(wall {result.wall_ms_per_step:.2f} ms per step, {result.steps} profiled steps)",
        "",
        "| class | ms / step | share |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {ms:.3f} | {100 * ms / total:.1f}% |" for label, ms in result.by_class.items()]
    lines += ["", "| kernel | class | ms / step | share | calls / step |", "|---|---|---|---|---|"]
    for row in result.top:
        name = str(row["kernel"])
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(
            f"| `{short}` | {row['class']} | {row['ms']:.3f} | {100 * row['ms'] / total:.1f}% | "
            f"{row['calls']:g} |"
        )
    if result.idle_ms_per_step is not None:
        lines += [
            "",
            f"GPU idle between kernels: {result.idle_ms_per_step:.3f} ms per step (under the profiler, "
            "which slows the host: an upper bound for host-bound gaps), by the host op whose kernel ended the gap:",
            "",
            "| kernel launched by | idle ms / step | gaps / step |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{r['launched_by']}` | {r['idle_ms']:.3f} | {r['gaps']:g} |" for r in result.idle_by_launcher
        ]
        lines += ["", "| host synchronisation | calls / step | host ms / step |", "|---|---|---|"]
        lines += [f"| `{r['call']}` | {r['calls']:g} | {r['host_ms']:.3f} |" for r in result.syncs]
    if result.host_wall_ms_per_step is not None:
        lines += [
            "",
            f"Host under cProfile: {result.host_wall_ms_per_step:.2f} ms wall per step; Python functions "
            "by self time (a wait for the GPU is the self time of the call that waited):",
            "",
            "| function | self ms / step | cumulative ms / step | calls / step |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{str(r['function'])[:100]}` | {r['self_ms']:.3f} | {r['cum_ms']:.3f} | {r['calls']:g} |"
            for r in result.host_top
        ]
    if result.by_op_shape:
        lines += [
            "",
            "Device time by kernel, the op that launched it and that op's input shapes (launched step):",
            "",
            "| kernel | op | input shapes | ms / step | calls / step |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{str(r['kernel'])[:70]}` | `{r['op']}` | `{str(r['shapes'])[:120]}` | {r['ms']:.3f} | {r['calls']:g} |"
            for r in result.by_op_shape
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=["moe", "dense", "attention", "step"])
    parser.add_argument("case", nargs="?", help="S1/S2/S3; dense/expert-KV/shared-KV; mixtral/...")
    parser.add_argument("--compile", action="store_true", help="profile the torch.compiled version")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="step: replay the whole step as one CUDA graph (train.cuda_graph)",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--host", action="store_true", help="add the host's Python functions (cProfile)")
    parser.add_argument(
        "--shapes",
        action="store_true",
        help="add device time by kernel, launching op and its input shapes (not with --cuda-graph)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny cases on the CPU (a test)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if smoke:
        jobs = [("moe", "tiny-fine"), ("dense", "tiny"), ("attention", "expert-KV"), ("step", "mixtral")]
        args.steps, args.warmup = 1, 1
    elif args.what is None or args.case is None:
        parser.error("name what to profile, e.g. `moe S2` or `step mixtral`")
    else:
        jobs = [(args.what, args.case)]
    results = []
    for what, case in jobs:
        if what in ("moe", "dense"):
            step = moe_case(case, what == "dense", args.compile, device, smoke)
        elif what == "attention":
            step = attention_case(case, args.compile, device, smoke)
        else:
            step = step_case(case, args.compile, device, smoke, args.cuda_graph)
        graphed = " as one CUDA graph" if args.cuda_graph and what == "step" and device.type == "cuda" else ""
        label = f"{what} {case}{' compiled' if args.compile else ''}{graphed} on {device.type}"
        result = profile(step, device, args.warmup, args.steps, args.top, label)
        if args.host or smoke:
            result.host_wall_ms_per_step, result.host_top = host_profile(step, device, args.steps, args.top)
        if args.shapes or smoke:
            result.by_op_shape = op_shape_profile(step, device, args.steps, args.top)
        results.append(result)
    for result in results:
        print("\n".join(report(result)))
        print()
    if args.json is not None:
        args.json.write_text(json.dumps([result.__dict__ for result in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
