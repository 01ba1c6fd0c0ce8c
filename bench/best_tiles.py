"""Print the tile spec of bench/gather_gemm.py's JSON with the best geometric-mean speed-up.

Used by bench/speed_gpu.sh to hand the sweep's winner to bench/moe_layer.py (--gather-tiles).
Only specs measured on every (shape, GEMM) row of the sweep compete, so that a spec that failed
on one shape cannot win on the others' average. Prints nothing (exit 1) when the file has no rows.

Usage: python bench/best_tiles.py runs/speed/gather.json [--shapes S2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def best_spec(rows: list[dict], shapes: set[str] | None = None) -> tuple[str, float] | None:
    """The spec with the highest geometric mean of baseline-time / gathered-time, and that mean."""
    rows = [r for r in rows if shapes is None or r["shape"] in shapes]
    cases = {(r["shape"], r["gemm"]) for r in rows}
    logs: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        logs[r["tiles"]].append(math.log(r["gathered_tflops"] / r["baseline_tflops"]))
    complete = {spec: sum(v) / len(v) for spec, v in logs.items() if len(v) == len(cases)}
    if not complete:
        return None
    spec = max(complete, key=complete.get)
    return spec, math.exp(complete[spec])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--shapes", nargs="+", default=None)
    args = parser.parse_args(argv)
    try:
        rows = json.loads(args.json.read_text())
    except (OSError, json.JSONDecodeError) as error:
        print(f"best_tiles: cannot read {args.json}: {error}", file=sys.stderr)
        return 1
    found = best_spec(rows, set(args.shapes) if args.shapes else None)
    if found is None:
        return 1
    spec, speedup = found
    print(spec)
    print(f"best_tiles: {spec} (geometric-mean speed-up {speedup:.3f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
