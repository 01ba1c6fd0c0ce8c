"""Atomic output folders: write into a staging folder beside the target, rename when complete.

A killed run leaves either nothing, or the previous complete output, never a half-written one.
Staging folders are named `.<target>.staging-<pid>-<random>`; a staging folder whose process
is gone is removed the next time the same target is written (and nothing else beside it is
touched).

`atomic_write_bytes` does the same for single files (`.<name>.tmp-<pid>-<random>`).

A failed write (a full disk, a filesystem that cannot rename folders) removes the staging folder,
keeps a previous output under its name and re-raises the OSError; `write_refusal` turns the
failures a user can fix into one `UpcycleError` sentence.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from upcycle.errors import UpcycleError

_STAGING_MARK = ".staging-"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def pid_alive(pid: int) -> bool:
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
        if not pid_text.isdigit() or pid_alive(int(pid_text)):
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
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UpcycleError(f"cannot create {target}: {ancestor} is a file, not a folder; choose another path")


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `target` in one rename.

    With `overwrite`, the previous folder is first renamed aside and deleted only after the new
    one is in place, so a kill at any point leaves a complete folder under one of the names.
    """
    target = Path(target).absolute()
    remove_stale_staging(target)  # first: it may restore a previous output that check_target must see
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}{_STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        yield staging
        fsync_dir(staging)
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class FolderRenameError(OSError):
    """Renaming an output folder failed (errno kept): the filesystem may not support it."""


def write_refusal(error: OSError, target: str | Path) -> UpcycleError | None:
    """One sentence for a failed write of the output folder `target` whose cause the user can
    fix (a full disk or quota, a filesystem without folder renames); None for other errors."""
    target = Path(target).absolute()
    if error.errno in _NO_SPACE:
        return UpcycleError(
            f"disk full while writing {target} ({error.strerror}); the partial output was removed, "
            f"free some space under {target.parent} or choose another output folder"
        )
    if isinstance(error, FolderRenameError):
        return UpcycleError(
            f"cannot move the finished output into place at {target}: renaming a folder failed "
            f"({error.strerror}), which this filesystem may not support; write to a local disk and copy "
            "the result from there"
        )
    return None


def _rename(source: Path, destination: Path) -> None:
    try:
        os.rename(source, destination)
    except OSError as error:
        raise FolderRenameError(error.errno, error.strerror, os.fsdecode(source)) from error


def _replace_dir(staging: Path, target: Path) -> None:
    if not target.exists():
        _rename(staging, target)
        fsync_dir(target.parent)
        return
    aside = target.parent / f".{target.name}{_STAGING_MARK}{os.getpid()}-old-{secrets.token_hex(4)}"
    _rename(target, aside)
    try:
        _rename(staging, target)
    except BaseException:
        os.rename(aside, target)  # the previous output goes back under its name
        raise
    fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary name and rename it into place (fsynced). Temporary
    files of the same name left by killed processes are removed first."""
    path = Path(path)
    _remove_stale_temporaries(path)
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


def _remove_stale_temporaries(path: Path) -> None:
    prefix = f".{path.name}.tmp-"
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix):
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not pid_alive(int(pid_text)):
                entry.unlink(missing_ok=True)
