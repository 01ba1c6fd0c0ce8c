"""Run the `upcycle` CLI as a user would: in a subprocess (`run_cli(..., subprocess=True)`), or,
by default, in-process through the same `main()` entry point, which is much faster (no second
interpreter importing torch) and exercises the same argument parsing, errors and exit codes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import subprocess as subprocess_module
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from upcycle.cli import main


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: object, subprocess: bool = False, timeout: float = 300) -> CliResult:
    argv = [str(a) for a in args]
    if subprocess:
        proc = subprocess_module.run(
            [sys.executable, "-m", "upcycle", *argv], capture_output=True, text=True, timeout=timeout
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's --version / --help / usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_refused(result: CliResult, *fragments: str) -> None:
    """Exit code 2, one sentence on stderr, no traceback, each fragment in the message."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("upcycle: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def tree(root: Path) -> dict[str, str]:
    """Every folder and file under `root` with the sha256 of its bytes (folders: 'dir'): compare
    before and after a refused run to show it wrote nothing."""
    return {
        str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


def write_input(path: Path, data: dict | bytes) -> Path:
    """A config file for a CLI run: raw bytes as they are (malformed YAML), a dict as YAML."""
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
