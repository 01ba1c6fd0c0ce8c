"""Conversion wall time and peak memory: upcycle's `btx` against mergekit-moe, on one CPU machine.

The case is perf.md's anchor: three 1.1B Llama checkpoints (TinyLlama shapes: 22 layers, D 2048,
F 5632, V 32000, 32/4 heads) mixed into one 3-expert MoE in bf16. The sources are random
checkpoints made by `bench/make_checkpoints.py` and cached outside the repository.

Each conversion runs as its own process, as a user runs it, started by a small launcher
(`run_measured`) so that its `ru_maxrss` is its own and not this script's (see LAUNCHER). Per run:

- the previous output is deleted and `sync` flushes its dirty pages, so that no earlier write
  is paid for during the timed run;
- `cold`: `sync; echo 3 > /proc/sys/vm/drop_caches` (root only) so the sources come from disk;
  `warm`: the source files are read once beforehand so they sit in the page cache.

Sides (all write bf16, all start from the same three folders):
- `upcycle btx → native`: `upcycle convert` with recipe btx (experts = the three FFNs; attention,
  norms, embeddings and head averaged over the three sources in fp32; new routers). Its writer
  fsyncs every shard before the atomic rename: the timed figure includes getting to disk.
- `upcycle btx → mixtral`: the same into the Mixtral export, when `upcycle.checkpoint.export`
  registers one (it is skipped otherwise and the table says so).
- `mergekit-moe`: base_model = source 1, experts = the three sources, `gate_mode: random`,
  `dtype: bfloat16`, `--lazy-unpickle` (a no-op for safetensors inputs, kept because perf.md's
  anchor asks for mergekit's memory options) and its defaults otherwise. `--low-cpu-memory`
  is NOT passed: in mergekit 0.1.5 it means "keep intermediates on the accelerator", which is
  meaningless on a CPU-only machine. mergekit copies attention/norms/embeddings from the base
  model (no averaging) and does not fsync; it holds a whole output shard (default 5B parameters,
  i.e. the whole 2.6B-parameter model here) in memory before writing it.

After each run a few output tensors are checked against the sources (expert i of a layer equals
source i's FFN; for upcycle, an attention matrix equals the mean of the three sources rounded to
bf16), so a fast but wrong run cannot count.

Usage:
    python bench/convert.py [--cache cold warm] [--repeats 2] [--results bench/RESULTS.md]
                            [--engine main=. --engine changed=/tmp/proto]  # A/B engine changes
mergekit lives in its own venv, with the CPU torch wheel installed first so that pip does not
pull a CUDA build:
    python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 <CPU wheel or index>
    /tmp/mk-venv/bin/pip install mergekit==0.1.5
The machine's load average is printed beside every run: other work on a 2-core machine changes
wall times by integer factors, so only compare figures taken at low load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from make_checkpoints import DEFAULT_ROOT, PRESETS, cached_checkpoints, parameter_count, tensor_shapes
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MERGEKIT = Path(os.environ.get("MERGEKIT_MOE", "/tmp/mk-venv/bin/mergekit-moe"))


@dataclass
class Run:
    side: str
    cache: str
    repeat: int
    wall_s: float
    durable_s: float  # wall + the fsync of the output it left unsynced
    peak_rss_bytes: int
    user_s: float
    sys_s: float
    output_bytes: int
    load_before: float
    disk_gb_s: float
    checked: str


# Runs the measured command and reports its rusage. It exists so that the measured process is
# forked from a ~12 MB interpreter: Linux carries the parent's RSS into a child's ru_maxrss
# (fork copies the RSS high-water mark; Python's vfork-based spawn passes the parent's peak through
# exec), so a child of this torch-importing script, or of pytest, would report at least the
# parent's peak. RUSAGE_CHILDREN and VmHWM polling have the same flaw or a race.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as handle:
    json.dump({"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "user_s": usage.ru_utime,
               "sys_s": usage.ru_stime, "exit_code": os.waitstatus_to_exitcode(status)}, handle)
"""


@dataclass
class Side:
    """One contender: how to run it, from which folder (which `upcycle` package `-m` finds), and
    whether its shared tensors are averaged (upcycle btx) or copied from the base (mergekit)."""

    label: str
    command: list[str]
    cwd: Path
    averaged: bool


def run_measured(command: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `command` in its own process; returns its wall time, peak RSS (its own, not inherited)
    and CPU times. Raises with the output's tail if it fails."""
    with tempfile.TemporaryDirectory() as scratch:
        report, log_path = Path(scratch) / "usage.json", Path(scratch) / "log"
        with open(log_path, "wb") as log:
            subprocess.run(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                check=False,
            )
        usage = json.loads(report.read_text()) if report.is_file() else {"exit_code": -1}
        if usage["exit_code"] != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(command[:4])} ... failed ({usage['exit_code']}):\n{tail}")
    return usage


def disk_write_speed(folder: Path, gib: float = 1.0) -> float:
    """GB/s of writing `gib` GiB of random bytes with fsync into `folder`: the disk is shared on
    cloud machines and its speed moves by 2× within minutes, so every round records it."""
    block = os.urandom(64 * 1024**2)
    path = folder / ".disk-probe"
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(int(gib * 1024**3) // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return gib * 1024**3 / 1e9 / seconds


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def warm_page_cache(folders: list[Path]) -> None:
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb") as handle:
                while handle.read(64 * 1024**2):
                    pass


def fsync_folder(folder: Path) -> float:
    """Seconds to fsync every file of an output: what it still owed the disk when its process
    exited (near 0 for upcycle, which fsyncs; the whole tail of the write for mergekit)."""
    start = time.perf_counter()
    for file in folder.iterdir():
        if file.is_file():
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


class OutputTensors:
    """Read single tensors of a safetensors folder (sharded or not) by name."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            with safe_open(folder / "model.safetensors", "pt") as handle:
                self.files = dict.fromkeys(handle.keys(), folder / "model.safetensors")

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], "pt") as handle:
            return handle.get_tensor(name)

    def has(self, name: str) -> bool:
        return name in self.files


def source_tensor(folder: Path, name: str) -> torch.Tensor:
    return OutputTensors(folder).get(name)


def check_output(out: Path, sources: list[Path], layers: int, averaged: bool) -> str:
    """Exactness of a few tensors; returns a short description of what was checked."""
    tensors = OutputTensors(out)
    layer = layers - 1
    prefix = f"model.layers.{layer}.mlp"
    moe = prefix if tensors.has(f"{prefix}.gate.weight") else f"model.layers.{layer}.block_sparse_moe"
    if tensors.has(f"{moe}.experts.gate_up_proj"):  # stacked [E, 2F, D] and [E, D, F]
        gate_up, down = tensors.get(f"{moe}.experts.gate_up_proj"), tensors.get(f"{moe}.experts.down_proj")
        experts = [(gate_up[e], down[e]) for e in range(len(sources))]
    else:  # classic Mixtral keys: w1 gate, w3 up, w2 down
        experts = [
            (
                torch.cat(
                    [tensors.get(f"{moe}.experts.{e}.w1.weight"), tensors.get(f"{moe}.experts.{e}.w3.weight")]
                ),
                tensors.get(f"{moe}.experts.{e}.w2.weight"),
            )
            for e in range(len(sources))
        ]
    for e, (gate_up, down) in enumerate(experts):
        gate = source_tensor(sources[e], f"{prefix}.gate_proj.weight")
        up = source_tensor(sources[e], f"{prefix}.up_proj.weight")
        assert torch.equal(gate_up, torch.cat([gate, up])), (
            f"{out}: expert {e} gate/up differs from source {e}"
        )
        assert torch.equal(down, source_tensor(sources[e], f"{prefix}.down_proj.weight")), f"expert {e} down"
    name = f"model.layers.{layer}.self_attn.o_proj.weight"
    if averaged:
        mean = sum(source_tensor(s, name).float() for s in sources) / len(sources)
        expected = mean.to(torch.bfloat16)
    else:
        expected = source_tensor(sources[0], name)
    assert torch.equal(tensors.get(name), expected), (
        f"{out}: {name} is not the expected {'mean' if averaged else 'copy'}"
    )
    router = tensors.get(f"{moe}.gate.weight")
    assert router.shape[0] == len(sources) and torch.isfinite(router.float()).all()
    return f"layer {layer} experts exact, o_proj {'mean' if averaged else 'copy'} exact"


def upcycle_command(sources: list[Path], out: Path, fmt: str, work: Path) -> list[str]:
    config = {
        "recipe": "btx",
        "sources": [str(s) for s in sources],
        "output": {"format": fmt, "dtype": "bfloat16"},
    }
    path = work / f"btx-{fmt}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [sys.executable, "-m", "upcycle", "convert", str(path), str(out), "--quiet"]


def mergekit_command(mergekit: Path, sources: list[Path], out: Path, work: Path) -> list[str]:
    config = {
        "base_model": str(sources[0]),
        "gate_mode": "random",
        "dtype": "bfloat16",
        "experts": [{"source_model": str(s)} for s in sources],
    }
    path = work / "mergekit-moe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [str(mergekit), str(path), str(out), "--lazy-unpickle", "--quiet", "--random-seed", "0"]


def available_formats(engine_dir: Path) -> list[str]:
    probe = (
        "import upcycle.conversion; from upcycle.checkpoint.export import EXPORTS; print(' '.join(EXPORTS))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=engine_dir
    )
    return result.stdout.split()


def parse_engine(text: str) -> tuple[str, Path]:
    label, _, folder = text.rpartition("=")
    folder = Path(folder).resolve()
    if not (folder / "upcycle" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{folder} has no upcycle/ package")
    return label or folder.name, folder


def build_sides(args, sources: list[Path], out: Path, work: Path) -> list[Side]:
    sides = []
    for label, folder in args.engine or [("", REPO)]:
        formats = available_formats(folder)
        name = f"upcycle[{label}]" if label else "upcycle"
        for fmt in ("native", "mixtral"):
            if f"upcycle-{fmt}" not in args.sides:
                continue
            if fmt not in formats:
                print(
                    f"# {name}: output format {fmt} is not registered (have: {', '.join(formats)}); skipped"
                )
                continue
            command = upcycle_command(sources, out, fmt, work)
            sides.append(Side(f"{name} btx → {fmt}", command, folder, True))
    if "mergekit" in args.sides:
        if args.mergekit.is_file():
            command = mergekit_command(args.mergekit, sources, out, work)
            sides.append(Side("mergekit-moe", command, work, False))
        else:
            print(f"# {args.mergekit} not found; mergekit skipped (see the docstring for the install)")
    return sides


def measure(
    side: Side, out: Path, cache: str, repeat: int, sources: list[Path], check, env: dict, disk: float
) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if cache == "cold":
        if not drop_page_cache():
            raise SystemExit("cold runs need root (writing /proc/sys/vm/drop_caches); use --cache warm")
    else:
        warm_page_cache(sources)
    load = os.getloadavg()[0]
    usage = run_measured(side.command, env, side.cwd)
    flush = fsync_folder(out)
    run = Run(
        side.label,
        cache,
        repeat,
        usage["wall_s"],
        usage["wall_s"] + flush,
        usage["peak_rss_bytes"],
        usage["user_s"],
        usage["sys_s"],
        folder_bytes(out),
        load,
        disk,
        check(out),
    )
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    print(
        f"  {side.label:<24} {cache:<4} wall {run.wall_s:6.1f} s  +fsync {run.durable_s:6.1f} s  peak RSS {run.peak_rss_bytes / 1e9:5.2f} GB  "
        f"user {run.user_s:5.1f} s  sys {run.sys_s:5.1f} s  load {load:4.1f}  [{run.checked}]",
        flush=True,
    )
    return run


def summarise(runs: list[Run]) -> list[dict]:
    """Median wall and max peak RSS per (side, cache); ratios against mergekit at the same cache."""
    rows = []
    for key in dict.fromkeys((r.side, r.cache) for r in runs):
        group = [r for r in runs if (r.side, r.cache) == key]
        rows.append(
            {
                "side": key[0],
                "cache": key[1],
                "runs": len(group),
                "wall_s": statistics.median(r.wall_s for r in group),
                "wall_min_s": min(r.wall_s for r in group),
                "durable_s": statistics.median(r.durable_s for r in group),
                "peak_rss_gb": max(r.peak_rss_bytes for r in group) / 1e9,
                "user_s": statistics.median(r.user_s for r in group),
                "sys_s": statistics.median(r.sys_s for r in group),
                "output_gb": group[0].output_bytes / 1e9,
                "load": max(r.load_before for r in group),
                "disk": (min(r.disk_gb_s for r in group), max(r.disk_gb_s for r in group)),
            }
        )
    # Ratios per round (same repeat and cache state, minutes apart), then their median: the
    # machine's load and disk speed drift between rounds far more than within one.
    for row in rows:
        for field, key in (("wall_s", "vs_mergekit"), ("durable_s", "durable_vs_mergekit")):
            ratios = []
            for run in runs:
                if (run.side, run.cache) != (row["side"], row["cache"]):
                    continue
                reference = next(
                    (
                        r
                        for r in runs
                        if r.side == "mergekit-moe" and (r.cache, r.repeat) == (run.cache, run.repeat)
                    ),
                    None,
                )
                if reference is not None:
                    ratios.append(getattr(run, field) / getattr(reference, field))
            row[key] = statistics.median(ratios) if ratios else None
    return rows


def table(rows: list[dict]) -> str:
    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "–"

    lines = [
        "| side | cache | runs | wall s (median) | wall s (min) | wall ÷ mergekit's, same round (median) | "
        "wall + output fsync s | same, ÷ mergekit's | peak RSS GB | user s | sys s | output GB | load avg | disk GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['side']} | {r['cache']} | {r['runs']} | {r['wall_s']:.1f} | {r['wall_min_s']:.1f} | "
            f"{ratio(r['vs_mergekit'])} | {r['durable_s']:.1f} | {ratio(r['durable_vs_mergekit'])} | "
            f"{r['peak_rss_gb']:.2f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['output_gb']:.2f} | "
            f"{r['load']:.1f} | {r['disk'][0]:.2f}–{r['disk'][1]:.2f} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} {platform.release()}"


def mergekit_version(mergekit: Path) -> str:
    python = mergekit.parent / "python"
    probe = "import importlib.metadata as m; print(m.version('mergekit'), m.version('transformers'), m.version('torch'))"
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def append_results(path: Path, rows: list[dict], header: dict[str, str], notes: list[str]) -> None:
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\nOne section per measurement; sections are appended, never edited.\n"
        )
    lines = [
        "",
        f"## Conversion: 3 × 1.1B Llama → 3-expert MoE, upcycle btx vs mergekit-moe ({header['date']})",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", table(rows), ""]
    lines += [f"- {note}" for note in notes]
    with open(path, "a") as handle:
        handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument("--count", type=int, default=3, help="sources = experts")
    parser.add_argument("--cache", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sides", nargs="+", default=["upcycle-native", "upcycle-mixtral", "mergekit"])
    parser.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT)
    parser.add_argument(
        "--engine",
        type=parse_engine,
        action="append",
        metavar="LABEL=DIR",
        help="run upcycle from DIR/upcycle (a copy with an engine change), labelled LABEL; repeat to "
        "compare several in the same rounds; default: this repository",
    )
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="checkpoint cache and scratch outputs"
    )
    parser.add_argument("--results", type=Path, default=None, help="append a section to this Markdown file")
    args = parser.parse_args()

    shape = PRESETS[args.preset]
    sources = cached_checkpoints(shape, args.count, root=args.root)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.root))
    out = args.root / "bench-output"
    sides = build_sides(args, sources, out, work)
    print(
        f"# {args.count} × {parameter_count(shape) / 1e9:.2f}B sources ({len(tensor_shapes(shape))} tensors each)"
    )
    runs: list[Run] = []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for repeat in range(args.repeats):
        disk = disk_write_speed(args.root)
        print(f"# repeat {repeat + 1}: disk writes {disk:.2f} GB/s (1 GiB, fsync)", flush=True)
        for cache in args.cache:
            for side in sides:

                def check(folder, averaged=side.averaged):
                    return check_output(folder, sources, shape.layers, averaged)

                print(f"# repeat {repeat + 1}: {side.label}, {cache} cache", flush=True)
                runs.append(measure(side, out, cache, repeat, sources, check, env, disk))
    shutil.rmtree(work, ignore_errors=True)

    rows = summarise(runs)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "upcycle"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    header = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_line(),
        "torch": torch.__version__,
        "commit": commit + (" (with uncommitted changes under upcycle/)" if dirty.strip() else ""),
        "mergekit, its transformers, its torch": mergekit_version(args.mergekit),
        "sources": f"{args.count} random {args.preset} checkpoints, bf16 ({parameter_count(shape) / 1e9:.2f}B each)",
        "command": "python bench/convert.py " + " ".join(sys.argv[1:]),
    }
    notes = [
        "cold: page cache dropped before the run; warm: sources read into the page cache first; the "
        "previous output deleted and synced before every run.",
        "wall = the process from start to exit (imports included); peak RSS = that process's ru_maxrss.",
        "upcycle fsyncs every shard (and renames atomically); mergekit-moe does neither, so 'wall + output "
        "fsync' adds the fsync of each side's output files after it exits: the time until the output is on disk.",
        "upcycle btx averages attention/norms/embeddings over the 3 sources; mergekit-moe copies the base's.",
    ]
    if args.results:
        append_results(args.results, rows, header, notes)
    print()
    print("\n".join(f"{key}: {value}" for key, value in header.items()))
    print(table(rows))


if __name__ == "__main__":
    main()
