"""The GPU benchmarks' CPU smoke runs (perf.md: on CPU, benchmarks only run as smoke tests).

Each script in bench/ builds, checks against its fp32 reference and times every implementation
on tiny shapes with `--cpu-smoke`, then prints its tables last. The scripts are loaded from their
files and their `main` called in this process (no second interpreter start-up), with the same
argument parsing as the command line.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

EXPECTED_ROWS = {
    "moe_layer": [
        "dense_ref",
        "hf eager",
        "hf grouped_mm",
        "ours eager",
        "ours grouped",
        "ours grouped skew",
    ],
    "attention_experts": [
        "dense",
        "moa expert-KV eager",
        "moa expert-KV wide",
        "moa shared-KV eager",
        "moa shared-KV wide",
    ],
}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(EXPECTED_ROWS))
def test_cpu_smoke_checks_times_and_prints_a_table(
    script: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    results = tmp_path / f"{script}.json"
    assert load_script(script).main(["--cpu-smoke", "--json", str(results)]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()

    # The output ends with a markdown table: a header, a rule, then one row per implementation.
    assert lines[-1].startswith("| ") and lines[-1].endswith(" |"), lines[-1]
    start = len(lines) - 1
    while lines[start - 1].startswith("|"):
        start -= 1
    header, rule, *rows = lines[start:]
    assert "TFLOP/s" in header and set(rule) <= set("|-")
    assert len({row.count("|") for row in [header, *rows]}) == 1
    for name in EXPECTED_ROWS[script]:
        matching = [row for row in rows if f"| {name} |" in row]
        assert matching, f"no row for {name}"
        assert all(row.rstrip(" |").endswith("ok") for row in matching), matching
        assert all("n/a |" not in row.split("|")[3] for row in matching)  # a time was measured

    payload = json.loads(results.read_text())
    assert {row["ok"] for row in payload["rows"]} == {True}
