"""The pipeline end to end on a reduced config: every stage's outputs, resume after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from pipeline_helpers import reduced_pipeline

from upcycle.eval import read_perplexity_report
from upcycle.pipeline import run_pipeline
from upcycle.pipeline.config import PipelineConfig
from upcycle.pipeline.demo import demo_config, sanity_checks


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    report = run_pipeline(reduced_pipeline(out), quiet=True)
    return out, report


def test_every_stage_leaves_its_outputs(finished):
    out, report = finished
    for stage in ("data", "seed", "branches/code", "branches/math", "mix/btx", "mix/bam", "mix/btm"):
        assert (out / stage / "DONE.json").is_file(), stage
    for name in ("btx", "bam", "sparse", "dense"):
        assert (out / "finetune" / name / "final" / "config.json").is_file(), name
        assert (out / "finetune" / name / "metrics.jsonl").is_file(), name
    evaluation = read_perplexity_report(out / "eval" / "eval.json")
    expected = {"seed", "branch-code", "branch-math", "btx", "bam", "sparse", "dense", "btm"}
    assert set(evaluation.scores) == expected
    assert set(evaluation.domains) == {"code", "math"}
    for name in ("btx", "bam", "sparse"):
        routing = json.loads((out / "routing" / name / "routing.json").read_text())
        assert routing["model"] == name and (out / "routing" / name / "routing_ffn.png").is_file()
    assert (out / "routing" / "bam" / "routing_attention.png").is_file()
    text = report.read_text()
    assert "Held-out perplexity" in text and "btx" in text and "![" in text


def test_compute_matched_budgets(finished):
    out, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    total, branches = summary["total_flops_per_model"], summary["branch_flops"]
    spent = summary["finetune_flops"]
    # The reference (btx) spends exactly branches + its finetune; others within one step of it.
    assert spent["btx"] + branches == pytest.approx(total)
    for name, per_model_total in (("bam", spent["bam"] + branches), ("sparse", spent["sparse"])):
        steps = json.loads((out / "finetune" / name / "DONE.json").read_text())["steps"]
        assert abs(per_model_total - total) <= 0.5 * (spent[name] / steps) + 1, name


def test_a_finished_pipeline_is_skipped(finished):
    out, _ = finished
    before = (out / "eval" / "eval.json").stat().st_mtime_ns
    started = time.monotonic()
    run_pipeline(reduced_pipeline(out), quiet=True)
    assert (out / "eval" / "eval.json").stat().st_mtime_ns == before
    assert time.monotonic() - started < 30


def test_killed_pipeline_resumes_to_the_same_numbers(finished, tmp_path):
    reference, _ = finished
    out = tmp_path / "run"
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(reduced_pipeline(out)))
    command = [sys.executable, "-m", "upcycle", "run", str(config_path), "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint_dir = out / "finetune" / "btx" / "checkpoints"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if checkpoint_dir.is_dir() and any(checkpoint_dir.glob("step-*")):
            proc.send_signal(signal.SIGKILL)  # inside the btx finetune, after a checkpoint
            break
        time.sleep(0.01)
    proc.wait()
    assert not (out / "eval" / "eval.json").exists(), "the kill came too late to test resuming"
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((out / "eval" / "eval.json").read_text())["models"]
    want = json.loads((reference / "eval" / "eval.json").read_text())["models"]
    assert {k: v["domains"] for k, v in got.items()} == {k: v["domains"] for k, v in want.items()}


def test_demo_config_and_sanity_checks(finished, tmp_path):
    config = demo_config(tmp_path / "demo")
    assert [m.recipe for m in config.mixes] == ["btx", "bam", "bam", "sparse", "dense", "btm"]
    out, _ = finished
    report = read_perplexity_report(out / "eval" / "eval.json")
    failures = sanity_checks(report)
    assert all(isinstance(f, str) for f in failures)
    # A doctored report where a branch loses on its own domain must fail the check.
    report.scores["branch-code"]["code"], report.scores["branch-math"]["code"] = (
        report.scores["branch-math"]["code"],
        report.scores["branch-code"]["code"],
    )
    assert any("branch-code" in f for f in sanity_checks(report))


def test_pipeline_refusals():
    from upcycle.errors import UpcycleError, validated

    base = reduced_pipeline("/tmp/unused")
    with pytest.raises(UpcycleError, match="either `corpus`"):
        two = {"a": {"paths": ["a.txt"]}, "b": {"paths": ["b.txt"]}}
        validated(PipelineConfig, {**base, "data": {"domains": two, "tokenizer": "x"}}, "p")
    with pytest.raises(UpcycleError, match="own `name`"):
        validated(PipelineConfig, {**base, "mixes": [{"name": "a", "recipe": "btx"}] * 2}, "p")
    with pytest.raises(UpcycleError, match="unknown key"):
        validated(PipelineConfig, {**base, "finetuning": {}}, "p")
