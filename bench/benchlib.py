"""What every GPU benchmark in bench/ shares: the environment line, timing, errors, formatting.

Imported by the scripts beside it (each puts bench/ on `sys.path` first, so this works both when
a script runs from the command line and when a test loads it from its file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
H100_BANDWIDTH_TBS = 3.35  # an H100 SXM's HBM3, what the memory-bound benches measure against


def load_script(name: str):
    """bench/NAME.py as a module (registered in sys.modules, where dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_header(device_name: str) -> str:
    """The first line of a result table: device, torch version, measured commit, date."""
    return f"# {device_name}, torch {torch.__version__}, commit {git_commit()}, {time.strftime('%Y-%m-%d')}"


def git_commit() -> str:
    """`UPCYCLE_COMMIT` when set (a copied working tree may carry a stale .git), else git's HEAD."""
    if os.environ.get("UPCYCLE_COMMIT"):
        return os.environ["UPCYCLE_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device, **extra: object) -> dict[str, object]:
    """Date, versions, commit and device of a run (plus `extra`), for the results' header."""
    info: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    info.update(extra)
    return info


@contextlib.contextmanager
def module_constants(module, values: dict[str, object]) -> Iterator[None]:
    """A module's switches or launch constants (module-level names) set to `values` for the
    block, then restored: the knobs the benches vary without changing the library's code."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def write_rows(path: Path, device: torch.device, rows: list, **extra: object) -> None:
    """A bench's rows (dataclasses) and its environment (`environment`, plus `extra`) as JSON."""
    payload = {"env": environment(device, **extra), "rows": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2))


def device_name(device: torch.device) -> str:
    """The GPU's name for a result table's header, "cpu" for the CPU smoke runs."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each of `steps` calls after `warmup`: CUDA events on a GPU, else a clock."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def time_graphed(
    fn: Callable[[], object], device: torch.device, warmup: int, steps: int, calls: int = 20
) -> list[float]:
    """Milliseconds a call of `fn` takes on the GPU with no host in the way: `calls` calls
    captured in one CUDA graph, each of `steps` replays timed by CUDA events and divided by
    `calls` (as the graphed training step runs its kernels). A short kernel timed by
    `time_calls` also times its launch from Python. On the CPU: `time_calls`."""
    if device.type != "cuda":
        return time_calls(fn, device, warmup, steps)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # first calls (Triton's compiles, allocations) outside the capture
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return [ms / calls for ms in time_calls(graph.replay, device, 1, steps)]


def matmul_ceiling(device: torch.device, sizes: tuple[int, ...] = (4096, 8192, 16384)) -> tuple[float, int]:
    """This card's bf16 matmul ceiling in FLOP/s, measured now: the fastest of square n³ GEMMs
    (`torch.mm`, the median of 10 graphed timings each), with the n that gave it.

    perf.md reports MFU "against the measured matmul ceiling (about 790 on H100)"; cards of one
    model differ by a few percent (clocks, power), so a step's MFU is also worth stating against
    the ceiling of the card that ran it, measured in the same process."""
    best, best_n = 0.0, 0
    for n in sizes:
        a, b, out = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(3))
        call = functools.partial(torch.mm, a, b, out=out)
        ms = statistics.median(time_graphed(call, device, warmup=2, steps=10, calls=4))
        if 2 * n**3 / (ms / 1e3) > best:
            best, best_n = 2 * n**3 / (ms / 1e3), n
        del a, b, out, call  # before the next size's operands are made
    return best, best_n


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp32; NaN when `actual` holds a NaN or an inf."""
    actual, expected = actual.float(), expected.float()
    if not torch.isfinite(actual).all():
        return float("nan")
    return float((actual - expected).norm() / expected.norm())


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den
