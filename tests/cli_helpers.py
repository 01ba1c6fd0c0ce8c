"""Run the `upcycle` CLI in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, timeout: float = 300) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", "upcycle", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def assert_refused(result: CliResult, *fragments: str) -> None:
    """Exit code 2, one sentence on stderr, no traceback, each fragment in the message."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("upcycle: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
