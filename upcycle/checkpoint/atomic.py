"""Atomic output folders: write into a staging folder beside the target, rename when complete.

A killed run leaves either nothing, or the previous complete output, never a half-written one.
Staging folders are named `.<target>.staging-<pid>-<random>`; a staging folder whose process
is gone is removed the next time the same target is written (and nothing else beside it is
touched).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from upcycle.errors import UpcycleError

_STAGING_MARK = ".staging-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: Path) -> None:
    """Delete staging folders of `target` left by processes that no longer run."""
    prefix = f".{target.name}{_STAGING_MARK}"
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if "-old-" in entry.name and not target.exists():
            # Killed between the two renames of an overwrite: the aside copy is the last
            # complete output, so it goes back under its name.
            os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse before any work when the target exists and may not be replaced."""
    if target.exists() and not overwrite:
        raise UpcycleError(
            f"{target} already exists; pass --overwrite to replace it or choose another folder"
        )
    if target.exists() and not target.is_dir():
        raise UpcycleError(f"{target} exists and is not a folder; remove it or choose another output path")


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `target` in one rename.

    With `overwrite`, the previous folder is first renamed aside and deleted only after the new
    one is in place, so a kill at any point leaves a complete folder under one of the names.
    """
    target = Path(target).absolute()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = target.parent / f".{target.name}{_STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        fsync_dir(staging)
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        fsync_dir(target.parent)
        return
    aside = target.parent / f".{target.name}{_STAGING_MARK}{os.getpid()}-old-{secrets.token_hex(4)}"
    os.rename(target, aside)
    os.rename(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary name and rename it into place (fsynced)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
