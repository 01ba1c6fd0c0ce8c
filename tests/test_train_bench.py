"""bench/train_step.py runs end to end on the CPU with `--tiny` (its figures mean nothing there)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from test_train_helpers import one_thread  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from benchlib import load_script


def test_train_step_bench_tiny_smoke(capsys, tmp_path):
    module = load_script("train_step")
    rows = module.main(["--tiny", "--json", str(tmp_path / "rows.json")])

    assert [r.case for r in rows] == ["dense", "btx4"]
    for row in rows:
        assert row.tokens_per_s > 0 and math.isfinite(row.loss) and row.mfu is None
    assert rows[0].moe_path == "-" and rows[1].moe_path in {"eager", "grouped"}
    assert rows[1].parameters > rows[0].parameters and rows[1].active > rows[0].active
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-3].startswith("| dense") is False and lines[-2].startswith("| dense |")
    assert lines[-1].startswith("| btx4 |")
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 2
