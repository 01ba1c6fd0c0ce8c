"""A `rich` progress bar for evaluation: one row per model, tokens scored, tokens/s, ETA.

It draws on stderr and only when stderr is a terminal and `quiet` is off, like the tokenisation
bar of `upcycle.data.progress`, so logs, tests and CI output stay clean.
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
        rate = task.completed / elapsed if elapsed else 0.0
        return Text(f"{rate:>10,.0f} tok/s")


class EvalProgress:
    """Context manager; `start(name, total_tokens)` then `advance(tokens)` as batches finish."""

    def __init__(self, quiet: bool = False) -> None:
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:>12,.0f} tokens"),
            _TokensPerSecondColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet or not console.is_terminal,
        )
        self._task = None

    def __enter__(self) -> EvalProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def start(self, description: str, total_tokens: int) -> None:
        self._task = self._progress.add_task(description, total=max(total_tokens, 1))

    def advance(self, tokens: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=tokens)
