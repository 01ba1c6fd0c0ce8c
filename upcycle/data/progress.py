"""A `rich` progress bar for tokenisation: one row per domain, source bytes done, tokens/s, ETA.

The bar advances by bytes of source read (known up front from file sizes), not by documents,
so the ETA is meaningful before the document count is known. It draws on stderr and only when
stderr is a terminal and `quiet` is off, so logs and CI output stay clean.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _TokensPerSecondColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        rate = task.fields.get("tokens", 0) / elapsed if elapsed else 0.0
        return Text(f"{rate / 1e6:6.2f} M tok/s")


class TokenizeProgress:
    """Context manager; call `advance(domain, source_bytes, tokens)` as work completes."""

    def __init__(self, source_bytes_by_domain: dict[str, int], quiet: bool = False):
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[tokens]:>14,} tokens"),
            _TokensPerSecondColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet or not console.is_terminal,
        )
        self._tasks = {
            name: self._progress.add_task(name, total=max(total, 1), tokens=0, start=False)
            for name, total in source_bytes_by_domain.items()
        }
        self._totals = {name: max(total, 1) for name, total in source_bytes_by_domain.items()}
        self._tokens = dict.fromkeys(source_bytes_by_domain, 0)

    def __enter__(self) -> TokenizeProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def start(self, domain: str) -> None:
        self._progress.start_task(self._tasks[domain])

    def advance(self, domain: str, source_bytes: int, tokens: int) -> None:
        self._tokens[domain] += tokens
        self._progress.update(self._tasks[domain], advance=source_bytes, tokens=self._tokens[domain])

    def finish(self, domain: str) -> None:
        self._progress.update(self._tasks[domain], completed=self._totals[domain])
        self._progress.stop_task(self._tasks[domain])
