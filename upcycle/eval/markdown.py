"""Markdown tables: the one formatter every report and command output in `upcycle.eval` uses."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], align_right_from: int = 1
) -> str:
    """A GitHub Markdown table; columns from `align_right_from` on are right-aligned (numbers).

    `|` inside a cell is escaped so that a model name cannot break the table.
    """

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    rule = ["---:" if i >= align_right_from else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
