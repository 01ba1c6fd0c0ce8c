"""`upcycle plot losses` and `upcycle report`: metrics JSONL read as the trainer writes it (extra
keys, rows without the plotted key, a truncated last line), several runs in one PNG, and a
Markdown report that merges perplexity tables over the same tokens, summarises routing and
embeds its figures; refusals name the fix."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
from cli_helpers import assert_refused, run_cli

from upcycle.eval.perplexity import DomainScore, DomainTokens, PerplexityReport
from upcycle.eval.plots import load_run, smoothed
from upcycle.eval.routing import RoutingReport


def write_run(path, losses, extra=None, truncated=False):
    rows = [
        {"step": step, "loss": loss, "lm_loss": loss - 0.01, "lr": 1e-4, "tokens_per_s": 1000.0 + step}
        for step, loss in enumerate(losses, start=1)
    ]
    lines = [json.dumps(r) for r in rows] + [json.dumps(e) for e in extra or []]
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"step": 99, "lo'
    path.write_text(text)
    return path


def test_loss_runs_are_read_as_the_trainer_writes_them(tmp_path):
    run = write_run(
        tmp_path / "a.jsonl", [3.0, 2.5, 2.0], extra=[{"step": 2, "eval_loss": 2.7}], truncated=True
    )
    loaded = load_run(run)
    assert loaded.x == [1.0, 2.0, 3.0] and loaded.y == [3.0, 2.5, 2.0] and loaded.label == "a"
    assert load_run(run, key="eval_loss").y == [2.7]
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    assert_refused(run_cli("plot", "losses", tmp_path / "bad.jsonl", "--out", tmp_path / "x.png"), "line 2")
    assert_refused(
        run_cli("plot", "losses", run, "--key", "grad_norm", "--out", tmp_path / "x.png"), "grad_norm"
    )
    assert smoothed([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected EMA


def test_plot_losses_overlays_runs_in_one_png(tmp_path):
    a = write_run(tmp_path / "sparse.jsonl", list(np.linspace(4, 2, 30)))
    b = write_run(tmp_path / "bam.jsonl", list(np.linspace(4, 1.5, 40)))
    out = tmp_path / "plots" / "losses.png"
    result = run_cli(
        "plot", "losses", a, b, "--out", out, "--smooth", 0.5, "--label", "sparse", "--label", "bam"
    )
    assert result.returncode == 0, result.stderr
    height, width, _ = matplotlib.image.imread(out).shape
    assert height > 300 and width > 500


def perplexity_report(models: dict[str, tuple[float, float]], sha: str = "a" * 64) -> PerplexityReport:
    return PerplexityReport(
        data="/data",
        data_fingerprint="f",
        seq_len=128,
        max_sequences=None,
        domains={"code": DomainTokens(2, 256, sha), "math": DomainTokens(2, 256, sha.replace("a", "b"))},
        scores={
            name: {"code": DomainScore(np.log(c) * 256, 256), "math": DomainScore(np.log(m) * 256, 256)}
            for name, (c, m) in models.items()
        },
    )


def routing_report() -> RoutingReport:
    record = {
        "kind": "ffn", "layer": 0, "routing": "topk_softmax", "num_experts": 3, "top_k": 2,
        "assignments": {"code": [4, 4, 0], "math": [1, 3, 4]},
        "assignment_share": {"code": [0.5, 0.5, 0.0], "math": [0.125, 0.375, 0.5]},
        "mean_probability": {"code": [0.4, 0.4, 0.2], "math": [0.2, 0.3, 0.5]},
        "entropy": {"code": 1.0, "math": 0.9}, "entropy_all": 0.95, "max_entropy": 1.0986,
        "dead_experts": [], "load_imbalance": 1.2,
    }  # fmt: skip
    return RoutingReport("/runs/btx", "/data", 128, None, ["code", "math"], {"code": 4, "math": 4}, [record])


def test_report_merges_tables_and_embeds_figures(tmp_path):
    (tmp_path / "e1").mkdir(), (tmp_path / "e2").mkdir(), (tmp_path / "e3").mkdir()
    (tmp_path / "e1" / "eval.json").write_text(
        json.dumps(perplexity_report({"sparse": (5.0, 7.0)}).to_json())
    )
    (tmp_path / "e2" / "eval.json").write_text(json.dumps(perplexity_report({"btx": (4.0, 8.0)}).to_json()))
    other_tokens = perplexity_report({"btm": (3.0, 3.0)}, sha="c" * 64)
    (tmp_path / "e3" / "eval.json").write_text(json.dumps(other_tokens.to_json()))
    (tmp_path / "routing.json").write_text(json.dumps(routing_report().to_json()))
    run = write_run(tmp_path / "btx.jsonl", [3.0, 2.0, 1.5])
    out = tmp_path / "report"
    evals = [tmp_path / e / "eval.json" for e in ("e1", "e2", "e3")]
    args = ["report", out, "--eval", *evals, "--routing", tmp_path / "routing.json", "--losses", run]
    result = run_cli(*args, "--title", "BTX vs sparse")
    assert result.returncode == 0, result.stderr
    text = (out / "report.md").read_text()
    assert text.startswith("# BTX vs sparse")
    # One table for the two reports on the same tokens, best of each column in bold; all = √(c·m).
    assert "| sparse | 5.000 | **7.000** | 5.916 |\n| btx | **4.000** | 8.000 | **5.657** |" in text
    assert "separate tables" in text and "| btm | 3.000 | 3.000 | 3.000 |" in text
    assert "| 0 | FFN | topk_softmax (k=2/3) | 0.950 / 1.099 | none | 1.20 |" in text
    assert "| btx | 3 | 1.5000 | 1.5000 | 1,002 |" in text
    for image in ("figures/routing0_ffn.png", "figures/losses.png"):
        assert f"]({image})" in text and (out / image).is_file()
    again = run_cli(*args)  # a previous report is replaced
    assert again.returncode == 0, again.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert_refused(run_cli("report", tmp_path / "busy", "--losses", run), "does not hold a previous report")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert_refused(run_cli("report", tmp_path / "r2"), "nothing to report")
    assert_refused(run_cli("report", tmp_path / "r3", "--eval", run), "give an eval.json")
