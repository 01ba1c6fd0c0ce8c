"""PNG figures: routing heatmaps (layers as panels, domains × experts) and loss curves.

matplotlib is imported only here, with the non-interactive Agg backend, so that nothing in
upcycle needs a display and the rest of the package does not pay for the import.

Metrics files are the trainer's JSONL: one JSON object per line with at least `step` and the
plotted key (`loss` by default); other keys are ignored. Lines without the key (an evaluation
row, say) are skipped; a truncated last line (a run killed while writing) is skipped too; any
other malformed line is refused with its line number.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import UpcycleError

Panel = tuple[str, Sequence[Sequence[float]]]  # title, rows (domains) × columns (experts)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UpcycleError(
            "figures need matplotlib, which is not installed; pip install matplotlib"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_routing_heatmaps(
    panels: Sequence[Panel], domains: Sequence[str], out_png: str | Path, title: str
) -> Path:
    """One heatmap per panel on a shared 0..1 colour scale, values written in the cells."""
    plt = _pyplot()
    num_experts = max(len(rows[0]) for _, rows in panels)
    lines = math.ceil(len(panels) / 4)  # at most 4 panels a row, rows as even as possible
    columns = math.ceil(len(panels) / lines)
    cell = 0.55
    width = columns * max(2.8, 1.2 + cell * num_experts)
    height = lines * max(2.2, 1.2 + cell * len(domains)) + 0.8
    figure, axes = plt.subplots(lines, columns, figsize=(width, height), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels) :]:
        ax.remove()
    shown = list(axes.flat[: len(panels)])
    for ax, (panel_title, rows) in zip(shown, panels, strict=True):
        image = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(panel_title, fontsize=9)
        ax.set_xticks(range(len(rows[0])), [str(e) for e in range(len(rows[0]))], fontsize=8)
        ax.set_yticks(range(len(domains)), list(domains), fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        if len(rows[0]) * len(domains) <= 160:
            for r, row in enumerate(rows):
                for e, value in enumerate(row):
                    color = "black" if value > 0.6 else "white"
                    ax.text(e, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    figure.colorbar(image, ax=shown, shrink=0.8, label="share (rows sum to 1)")
    figure.suptitle(title, fontsize=11)
    return _save(figure, plt, out_png)


@dataclass
class Run:
    """One metrics file: its label and the (x, y) points of the plotted key."""

    label: str
    x: list[float]
    y: list[float]
    rows: list[dict]


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL metrics file (see the module docstring for what is skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UpcycleError(f"cannot read metrics file {path} ({error.strerror}); check the path") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a run killed mid-write leaves a partial last line
            raise UpcycleError(f"{path} line {number} is not JSON; fix or truncate the file") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(path: str | Path, key: str = "loss", x_key: str = "step", label: str | None = None) -> Run:
    rows = read_metrics(path)
    points = [
        (float(r[x_key]), float(r[key]))
        for r in rows
        if isinstance(r.get(x_key), int | float) and isinstance(r.get(key), int | float)
    ]
    if not points:
        raise UpcycleError(f"{path} has no row with both {x_key!r} and {key!r}; choose keys it logs")
    points.sort()
    return Run(label or run_label(path), [p[0] for p in points], [p[1] for p in points], rows)


def run_label(path: str | Path) -> str:
    """The file's stem, or its folder's name when the stem is generic (`metrics.jsonl`)."""
    path = Path(path)
    return path.parent.name if path.stem in ("metrics", "train", "log") and path.parent.name else path.stem


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with `weight` on the past (0: no smoothing), bias-corrected."""
    if weight <= 0:
        return list(values)
    out, average, correction = [], 0.0, 1.0
    for value in values:
        average = weight * average + (1 - weight) * value
        correction *= weight
        out.append(average / (1 - correction))
    return out


def plot_losses(
    runs: Sequence[Run],
    out_png: str | Path,
    key: str = "loss",
    x_key: str = "step",
    smooth: float = 0.0,
    log_y: bool = False,
    title: str | None = None,
) -> Path:
    """Every run's curve in one axes; with smoothing, the raw curve stays behind, faded."""
    if not 0 <= smooth < 1:
        raise UpcycleError(f"--smooth must be in [0, 1), got {smooth}")
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        if smooth > 0:
            ax.plot(run.x, run.y, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(run.x, smoothed(run.y, smooth), color=color, linewidth=1.5, label=run.label)
    ax.set_xlabel(x_key)
    ax.set_ylabel(key)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{key} by {x_key}")
    return _save(figure, plt, out_png)


def _save(figure, plt, out_png: str | Path) -> Path:
    from upcycle.checkpoint.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())
    return out
