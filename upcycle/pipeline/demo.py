"""`upcycle demo`: the whole mission on a laptop, from nothing to a report, in a few minutes.

It runs the packaged `demo.yaml` pipeline (built-in corpus, a ~3M-parameter seed, four domain
branches, BTX, BAM in both variants, sparse upcycling, dense continued training and BTM at equal
compute), prints the per-domain comparison table with the report's path, and checks that the
numbers make sense: every branch is the best branch on its own domain, and the mixed models
beat the seed on the average. A failed check exits with code 1 (CI runs the demo).
"""

from __future__ import annotations

import math
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from upcycle.eval import read_perplexity_report
from upcycle.pipeline.config import PipelineConfig
from upcycle.pipeline.run import Pipeline

MIXED = ("btx", "bam-expert-kv", "bam-shared-kv")


def demo_config(out_dir: str | Path) -> PipelineConfig:
    data = yaml.safe_load(resources.files("upcycle.pipeline").joinpath("demo.yaml").read_text())
    data["output"] = str(out_dir)
    return PipelineConfig.model_validate(data)


def sanity_checks(report) -> list[str]:
    """What must hold for the demo's numbers to make sense; returns the failures."""
    failures = []
    domains = list(report.domains)
    branches = {d: f"branch-{d}" for d in domains if f"branch-{d}" in report.scores}
    for domain, own in branches.items():
        best = min(branches.values(), key=lambda name: report.scores[name][domain].perplexity)
        if best != own:
            failures.append(f"on {domain}, {best} beats {own}, the branch trained on it")
    seed = report.overall("seed").perplexity
    for name in MIXED:
        if name in report.scores and not report.overall(name).perplexity < seed:
            failures.append(
                f"{name} ({report.overall(name).perplexity:.2f}) does not beat the seed ({seed:.2f})"
            )
    return failures


def run_demo(out_dir: str | Path = "runs/demo", quiet: bool = False) -> int:
    started = time.monotonic()
    config = demo_config(out_dir)
    report_path = Pipeline(config, quiet=quiet).run()
    report = read_perplexity_report(Path(config.output) / "eval" / "eval.json")
    print(report.markdown())
    routing = sorted(Path(config.output, "routing").glob("*/*.png"))
    print(f"report:   {report_path}")
    for png in routing:
        print(f"picture:  {png}")
    failures = sanity_checks(report)
    minutes = (time.monotonic() - started) / 60
    if failures:
        for failure in failures:
            print(f"sanity check failed: {failure}", file=sys.stderr)
        return 1
    seed = report.overall("seed").perplexity
    best = min(MIXED, key=lambda n: report.overall(n).perplexity if n in report.scores else math.inf)
    print(
        f"sanity checks passed: each branch is best on its own domain; {best} "
        f"({report.overall(best).perplexity:.2f}) beats the seed ({seed:.2f}) on the average. "
        f"{minutes:.1f} min."
    )
    return 0
