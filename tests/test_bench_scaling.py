"""bench/scaling.py runs end to end on the CPU with `--smoke`: torchrun launches of 1 process
and of 2 processes with expert parallelism over gloo, a tiny model; its figures mean nothing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from benchlib import load_script


def test_scaling_bench_smoke(capsys, tmp_path):
    module = load_script("scaling")
    rows = module.main(["--smoke", "--json", str(tmp_path / "rows.json")])

    assert [(r.gpus, r.ep, r.dp) for r in rows] == [(1, 1, 1), (2, 2, 1)]
    for row in rows:
        assert row.tokens_per_s_per_gpu > 0 and math.isfinite(row.loss) and row.mfu is None
        assert row.tokens_per_step == 2 * 32 * row.gpus  # weak scaling: the global batch grows
    assert rows[0].efficiency == 1.0 and rows[1].efficiency > 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert "weak-scaling efficiency" in lines[-4]
    assert lines[-2].startswith("| 1 | 1 | 1 |") and lines[-1].startswith("| 2 | 2 | 1 |")
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 2
    for name, value in module.NCCL_ENV.items():
        assert value in ("0", "1") and name.isupper()
