"""Where in a training step the GPU waits for the host: the step's slack at its block boundaries.

For each point P of a step (the start of every block's forward and backward, each per-expert
weight-gradient loop, the gradient norm, the optimiser step) the host time at which P was reached
and a CUDA event recorded there are taken, over steps run back to back as a training loop runs
them. slack(P) = (GPU time at which the work queued before P was done) − (host time of P): how far
the GPU queue ran behind the host. Near 0, the GPU was waiting for the host at P; a step whose
slack stays near 0 is host-bound from there on. The first timed step starts from an idle GPU and
is left out; the table is the median over the others.

The marks are taken outside the compiled code: every block is wrapped in a module that marks and
then calls it, and backward points are hooks on the blocks' output tensors, so that no mark breaks
a compiled graph. The per-expert loop is marked by wrapping
`upcycle.kernels.grouped_moe.grouped_weight_grad`.

Usage (GPU):  python bench/host_lag.py [--case mixtral-bf16w] [--compile] [--steps 6]
CPU smoke:    python bench/host_lag.py --tiny      (host times only; slack means nothing there)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load_script, run_header

from upcycle.kernels import grouped_moe


class Marks:
    """(name, host seconds, CUDA event or None) in the order reached; names numbered per step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.items, self.seen = cuda, [], defaultdict(int)

    def __call__(self, name: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.items.append((name, time.perf_counter(), event))

    def numbered(self, name: str) -> str:
        self.seen[name] += 1
        return f"{name} {self.seen[name]}"


class _Marked(nn.Module):
    """A block that marks its forward start, and its backward start through its output."""

    def __init__(self, block: nn.Module, index: int, marks: Marks) -> None:
        super().__init__()
        self.block, self.index, self.marks = block, index, marks

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, *args, **kwargs):
        self.marks(f"forward, block {self.index}")
        out = self.block(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        if torch.is_tensor(first) and first.requires_grad:
            first.register_hook(lambda grad: self.marks(f"backward, block {self.index}"))
        return out


def instrument(model: nn.Module, step, marks: Marks):
    """Mark `model`'s blocks and `step`'s norm and optimiser; returns the function that puts
    the module-level weight-gradient loop back (the blocks stay wrapped)."""
    layers = model.model.layers
    for index in range(len(layers)):
        layers[index] = _Marked(layers[index], index, marks)
    loop = grouped_moe.grouped_weight_grad

    def marked_loop(*args, **kwargs):
        name = marks.numbered("weight-gradient loop")
        marks(f"{name} starts")
        out = loop(*args, **kwargs)
        marks(f"{name} ends")
        return out

    grouped_moe.grouped_weight_grad = marked_loop
    norm = step._grad_norm
    step._grad_norm = lambda: (marks("gradient norm"), norm())[1]
    optimizer_step = step.optimizer.step

    def marked_step(*args, **kwargs):
        marks("optimizer step")
        return optimizer_step(*args, **kwargs)

    step.optimizer.step = marked_step

    def restore() -> None:
        grouped_moe.grouped_weight_grad = loop

    return restore


def measure(args) -> list[tuple[str, float, float, float]]:
    """(point, host ms, GPU ms from the step's start, slack ms) medians over the timed steps."""
    train_step = load_script("train_step")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    settings = argparse.Namespace(
        compile=args.compile, batch=2 if args.tiny else 8, seq_len=32 if args.tiny else 2048, cuda_graph=False
    )
    config = train_step.case_configs(args.tiny)[args.case]
    model, step = train_step.build_step(args.case, config, settings, device)
    batches = train_step.random_batches(config, 1, settings.batch, settings.seq_len, device)
    marks = Marks(device.type == "cuda")
    restore = instrument(model, step, marks)
    try:
        counter = iter(range(1, 10**9))
        for _ in range(args.warmup):
            step(next(counter), [batches[0]])
        if marks.cuda:
            torch.cuda.synchronize(device)
        marks.items.clear()
        marks("base")
        starts = []
        for _ in range(args.steps):
            marks.seen.clear()
            starts.append(len(marks.items))
            marks("step starts")
            step(next(counter), [batches[0]])
        if marks.cuda:
            torch.cuda.synchronize(device)
    finally:
        restore()
    _, host0, event0 = marks.items[0]

    def gpu_s(event) -> float:
        return event0.elapsed_time(event) / 1000 if event is not None else 0.0

    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for begin, end in zip(starts[1:], [*starts[2:], len(marks.items)], strict=True):
        _, host_start, event_start = marks.items[begin]
        for name, host, event in marks.items[begin:end]:
            slack = gpu_s(event) - (host - host0)
            rows[name].append(
                ((host - host_start) * 1e3, (gpu_s(event) - gpu_s(event_start)) * 1e3, slack * 1e3)
            )
    return [
        (name, *(statistics.median(v[i] for v in values) for i in range(3))) for name, values in rows.items()
    ]


def main(argv: list[str] | None = None) -> list[tuple[str, float, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case", default="mixtral-bf16w", choices=["mixtral", "mixtral-bf16w", "dense", "btx4"]
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--steps", type=int, default=6, help="steps back to back (the first is left out)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", "--cpu-smoke", action="store_true", help="a tiny model on the CPU")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup = 3, 1
    rows = measure(args)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "CPU"
    print(
        f"{run_header(name)}; {args.case}{' compiled' if args.compile else ''}, median of {args.steps - 1} steps"
    )
    print("| point of the step | host ms from its start | GPU ms from its start | slack ms |")
    print("|---|---|---|---|")
    cuda = name != "CPU"
    for point, host, gpu, slack in rows:
        print(
            f"| {point} | {host:.2f} | {f'{gpu:.2f}' if cuda else '-'} | {f'{slack:.2f}' if cuda else '-'} |"
        )
    return rows


if __name__ == "__main__":
    main()
