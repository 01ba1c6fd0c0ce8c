"""Evaluation: per-domain perplexity, routing statistics, the BTM ensemble, plots and reports.

Public API:

- `evaluate_perplexity(models, manifest, ...) -> PerplexityReport`: held-out perplexity per
  domain, the same tokens for every model (perplexity.py); `write_perplexity_report`;
- `BTMEnsemble`, `build_btm`, `DomainTfidf`: Branch-Train-Merge's output-mixing ensemble with a
  tf-idf domain router, evaluable like any model (btm.py, tfidf.py);
- `analyze_routing(model, manifest, ...) -> RoutingReport`: per-layer, per-domain routing of the
  FFN and attention routers; `write_routing_report` adds heatmap PNGs (routing.py);
- `plot_losses`, `load_run`, `plot_routing_heatmaps`: figures (plots.py);
- `build_report(out_dir, eval_files=..., routing_files=..., loss_files=...)`: a Markdown report
  (report.py);
- `load_evaluable(path)`: a checkpoint or BTM folder as an evaluable model (models.py);
- `upcycle.eval.harness`: lm-eval-harness on native and exported checkpoints.
"""

from upcycle.eval.btm import BTMEnsemble, build_btm
from upcycle.eval.models import load_evaluable
from upcycle.eval.perplexity import (
    DomainScore,
    PerplexityReport,
    evaluate_perplexity,
    read_perplexity_report,
    write_perplexity_report,
)
from upcycle.eval.plots import load_run, plot_losses, plot_routing_heatmaps
from upcycle.eval.report import build_report
from upcycle.eval.routing import RoutingReport, analyze_routing, read_routing_report, write_routing_report
from upcycle.eval.tfidf import DomainTfidf

__all__ = [
    "BTMEnsemble",
    "DomainScore",
    "DomainTfidf",
    "PerplexityReport",
    "RoutingReport",
    "analyze_routing",
    "build_btm",
    "build_report",
    "evaluate_perplexity",
    "load_evaluable",
    "load_run",
    "plot_losses",
    "plot_routing_heatmaps",
    "read_perplexity_report",
    "read_routing_report",
    "write_perplexity_report",
    "write_routing_report",
]
