"""A Markdown report for a set of runs: perplexity tables, routing summaries and heatmaps, loss curves.

Inputs are the files the other commands write: `eval.json` (`upcycle eval`), `routing.json`
(`upcycle analyze routing`) and training metrics JSONL. The report folder holds `report.md` and
a `figures/` folder; figures are redrawn from the JSON numbers, so the report does not depend on
PNG files lying beside the inputs.

Perplexity reports that scored exactly the same tokens (same domains, same token hashes) are
merged into one table, with the best (lowest) perplexity of each column in bold; reports on
different tokens stay in separate tables, because their numbers are not comparable.

The folder is written atomically. An existing folder is replaced only when it holds a previous
report (a `report.md`) or nothing; any other folder is refused, so a mistyped path cannot wipe
unrelated files.
"""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Sequence
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.eval.markdown import markdown_table
from upcycle.eval.perplexity import PerplexityReport, read_perplexity_report
from upcycle.eval.plots import load_run, plot_losses, plot_routing_heatmaps
from upcycle.eval.routing import RoutingReport, read_routing_report

REPORT_FILE = "report.md"


def build_report(
    out_dir: str | Path,
    *,
    eval_files: Sequence[str | Path] = (),
    routing_files: Sequence[str | Path] = (),
    loss_files: Sequence[str | Path] = (),
    title: str = "upcycle report",
    loss_key: str = "loss",
) -> Path:
    """Write `out_dir/report.md` and its figures; return the path of `report.md`."""
    from upcycle.checkpoint.atomic import atomic_output_dir

    if not (eval_files or routing_files or loss_files):
        raise UpcycleError("nothing to report; give --eval, --routing or --losses files")
    out = Path(out_dir)
    _check_replaceable(out)
    evals = [(Path(p), read_perplexity_report(p)) for p in eval_files]
    routings = [(Path(p), read_routing_report(p)) for p in routing_files]
    runs = [load_run(p, key=loss_key) for p in loss_files]
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "figures").mkdir()
        sections = [
            f"# {title}\n\nGenerated {datetime.datetime.now().isoformat(timespec='seconds')} by upcycle.\n",
            _perplexity_section(evals),
            _routing_section(routings, staging),
            _training_section(runs, staging, loss_key),
            _inputs_section(eval_files, routing_files, loss_files),
        ]
        (staging / REPORT_FILE).write_text("\n".join(s for s in sections if s))
    return out / REPORT_FILE


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_FILE).is_file())):
        raise UpcycleError(
            f"{out} exists and does not hold a previous report; choose a new or empty folder for the report"
        )


def _perplexity_section(evals: list[tuple[Path, PerplexityReport]]) -> str:
    if not evals:
        return ""
    groups: dict[tuple, list[tuple[Path, PerplexityReport]]] = {}
    for path, report in evals:
        key = (report.seq_len, tuple((d, t.sha256) for d, t in report.domains.items()))
        groups.setdefault(key, []).append((path, report))
    parts = ["## Held-out perplexity\n"]
    if len(groups) > 1:
        parts.append(
            "The eval files scored different tokens (other data, seq_len or max_sequences), so they are "
            "shown in separate tables.\n"
        )
    for members in groups.values():
        parts.append(_merged_perplexity_table(members))
    return "\n".join(parts)


def _merged_perplexity_table(members: list[tuple[Path, PerplexityReport]]) -> str:
    first = members[0][1]
    domains = list(first.domains)
    rows: dict[str, list[float]] = {}
    for path, report in members:
        for name in report.scores:
            label = name if name not in rows else f"{name} ({path.parent.name or path.stem})"
            perplexities = [report.scores[name][d].perplexity for d in domains]
            rows[label] = [*perplexities, report.overall(name).perplexity]
    best = [min(values[i] for values in rows.values()) for i in range(len(domains) + 1)]
    table_rows = [
        [
            name,
            *(f"**{v:.3f}**" if v == best[i] and len(rows) > 1 else f"{v:.3f}" for i, v in enumerate(values)),
        ]
        for name, values in rows.items()
    ]
    tokens = [f"{first.domains[d].tokens:,}" for d in domains]
    table_rows.append(["tokens", *tokens, f"{sum(t.tokens for t in first.domains.values()):,}"])
    table = markdown_table(["model", *domains, "all"], table_rows)
    return (
        f"seq_len {first.seq_len}; data `{first.data}`; token-weighted; `all` pools every domain's "
        f"tokens; best per column in bold.\n\n{table}\n"
    )


def _routing_section(routings: list[tuple[Path, RoutingReport]], staging: Path) -> str:
    if not routings:
        return ""
    parts = ["## Routing\n"]
    for index, (path, report) in enumerate(routings):
        parts.append(f"### {Path(report.model).name}\n")
        parts.append(
            f"Held-out tokens per domain: {', '.join(f'{d} {n:,}' for d, n in report.tokens.items())} "
            f"(seq_len {report.seq_len}); from `{path}`.\n"
        )
        parts.append(report.markdown())
        for kind, label in (("ffn", "FFN experts"), ("attention", "attention experts")):
            panels = report.heatmap_panels(kind)
            if panels:
                name = f"figures/routing{index}_{kind}.png"
                plot_routing_heatmaps(
                    panels, report.domains, staging / name, f"{Path(report.model).name}: {label}"
                )
                parts.append(f"![{label} of {Path(report.model).name}]({name})\n")
    return "\n".join(parts)


def _training_section(runs: list, staging: Path, loss_key: str) -> str:
    if not runs:
        return ""
    plot_losses(runs, staging / "figures" / "losses.png", key=loss_key)
    rows = []
    for run in runs:
        speeds = [r["tokens_per_s"] for r in run.rows if isinstance(r.get("tokens_per_s"), int | float)]
        rows.append(
            [
                run.label,
                f"{run.x[-1]:g}",
                f"{run.y[-1]:.4f}",
                f"{min(run.y):.4f}",
                f"{statistics.median(speeds):,.0f}" if speeds else "",
            ]
        )
    headers = ["run", "last step", f"final {loss_key}", f"lowest {loss_key}", "median tokens/s"]
    return f"## Training\n\n![{loss_key} curves](figures/losses.png)\n\n{markdown_table(headers, rows)}\n"


def _inputs_section(*groups: Sequence[str | Path]) -> str:
    files = [str(p) for group in groups for p in group]
    return "## Inputs\n\n" + "\n".join(f"- `{f}`" for f in files) + "\n"
