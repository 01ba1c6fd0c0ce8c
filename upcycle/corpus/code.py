"""Python source code from the standard library on disk, as documents (one file = one document).

Which files, and in what order, is decided by the seed alone, so a seed gives the same bytes on
every machine with the same Python version (the stdlib differs between versions; the corpus
records the version it read).

Unusual choices, and why:
- Library modules come first, then the stdlib's own tests (each group in a seeded order). A small
  corpus is then ordinary library code, and a large one adds the tests rather than running out.
- Left out: `site-packages` (other projects, other licences), `__pycache__`, `pydoc_data` (a
  dictionary of English documentation, which is the prose fallback, not code), `encodings`
  (generated codec tables), files over 200 kB (generated tables and data) and files that are
  unreadable, not UTF-8 or hold NUL bytes (a few tests keep such files on purpose).
"""

from __future__ import annotations

import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from upcycle.corpus.documents import Document

__all__ = ["code_documents", "code_files", "stdlib_root"]

_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings"}
_TEST_FOLDERS = {"test", "tests", "idle_test"}
MAX_FILE_BYTES = 200_000
LICENSE = "PSF-2.0 (Python Software Foundation License Version 2; the stdlib's LICENSE.txt)"


def stdlib_root() -> Path:
    """The folder of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def code_files(root: Path, seed: int) -> list[Path]:
    """Every eligible `.py` file under `root`: library files, then tests, each in seeded order."""
    library, tests = [], []
    for folder, subfolders, files in os.walk(root):
        # Pruned in place, so os.walk never enters them (site-packages alone can be 10k files).
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_FOLDERS]
        relative = Path(folder).relative_to(root)
        group = tests if _TEST_FOLDERS.intersection(relative.parts) else library
        group += [Path(folder) / name for name in files if name.endswith(".py")]
    rng = random.Random(seed)
    for group in (library, tests):
        group.sort()  # os.walk's order depends on the filesystem; the seed alone decides ours
        rng.shuffle(group)
    return library + tests


def code_documents(seed: int, root: Path | None = None) -> Iterator[Document]:
    """The eligible files under `root` (default: the stdlib) as documents, in seeded order."""
    root = Path(root) if root is not None else stdlib_root()
    for path in code_files(root, seed):
        try:
            data = path.read_bytes()
        except OSError:  # a broken link or an unreadable file: skip it, as the docstring says
            continue
        if len(data) > MAX_FILE_BYTES or b"\0" in data:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield Document(text=text, source=f"python-stdlib/{path.relative_to(root).as_posix()}")
