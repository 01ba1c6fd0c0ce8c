"""Conversion and checkpoint saving on a disk a few MB large.

The disk is an 8 MiB tmpfs mounted by the test. Where mounting is refused (not root, no
CAP_SYS_ADMIN, a sandbox), the same tests run on an emulated disk of the same capacity: free
space is reported by a patched `shutil.disk_usage`, and writes into the folder (the safetensors
writer's file handles, `Path.write_text` and `Path.write_bytes`) fail with ENOSPC once the folder
holds that many bytes. Each test runs on both backends, so the emulation is exercised in CI too.

What is checked (reliability.md items 13 and 14):
- a conversion whose size estimate exceeds the free space is refused before anything is written,
  with a message that names both sizes;
- when the disk fills up *after* the check (another process writing, simulated by filling the
  disk from a wrapped `check_disk_space`), the CLI exits 2 with one "disk full" sentence naming
  the fix, leaves no output folder and no staging folder, gives the space back, keeps a previous
  complete output byte for byte, and the next run (once space is free) succeeds;
- `upcycle init` (the native checkpoint save) fails the same clean way;
- on a filesystem that cannot rename folders (os.rename raising ENOSYS or EXDEV, as on
  mountpoint-s3), the run is refused with one sentence and never leaves a truncated output.
"""

from __future__ import annotations

import builtins
import collections
import errno
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cli_helpers import assert_refused, run_cli
from hf_models import build_hf_model

import upcycle
from upcycle.checkpoint import convert as engine
from upcycle.checkpoint import safetensors_io

CAPACITY = 8 * 1024**2
DiskUsage = collections.namedtuple("DiskUsage", "total used free")


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class SmallDisk:
    """A folder on a disk of `CAPACITY` bytes: a real tmpfs, or the emulation described above."""

    def __init__(self, path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        path.mkdir()
        self.mounted = backend == "tmpfs" and self._mount()
        self.backend = "tmpfs" if self.mounted else "emulated"
        if not self.mounted:
            self._emulate(monkeypatch)

    def _mount(self) -> bool:
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={CAPACITY}", "tmpfs", str(self.path)],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0 and shutil.disk_usage(self.path).total == CAPACITY

    def unmount(self) -> None:
        if self.mounted:
            busy = subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0
            if busy:  # a file left open: release the mount anyway, then fail the test
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            assert not busy, "the tmpfs could not be unmounted: a file under it is still open"

    def owns(self, path: object) -> bool:
        try:
            return Path(os.fsdecode(path)).absolute().is_relative_to(self.path)
        except (TypeError, ValueError):
            return False

    def free(self) -> int:
        if self.mounted:
            return shutil.disk_usage(self.path).free
        return CAPACITY - folder_bytes(self.path)

    def fill(self, leave: int) -> None:
        """Take all free space but `leave` bytes, as another process writing would."""
        with open(self.path / "filler", "ab") as handle:
            handle.write(b"\0" * max(0, self.free() - leave))

    def unfill(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    # -- the emulation -------------------------------------------------------------------------
    def _emulate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_usage, real_open = shutil.disk_usage, builtins.open
        real_write_text, real_write_bytes = Path.write_text, Path.write_bytes
        disk = self

        def disk_usage(path):
            if disk.owns(path):
                return DiskUsage(CAPACITY, CAPACITY - disk.free(), disk.free())
            return real_usage(path)

        def guarded_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return QuotaFile(handle, disk) if disk.owns(file) and set(mode) & set("wax+") else handle

        def write_text(path, data, *args, **kwargs):
            disk.reserve(path, len(data.encode()))
            return real_write_text(path, data, *args, **kwargs)

        def write_bytes(path, data):
            disk.reserve(path, len(data))
            return real_write_bytes(path, data)

        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        monkeypatch.setattr(safetensors_io, "open", guarded_open, raising=False)
        monkeypatch.setattr(Path, "write_text", write_text)
        monkeypatch.setattr(Path, "write_bytes", write_bytes)

    def reserve(self, path: object, size: int) -> None:
        if self.owns(path) and size > self.free():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))


class QuotaFile:
    """A file handle whose writes fail with ENOSPC (after writing what fits) when the disk is full."""

    def __init__(self, handle, disk: SmallDisk) -> None:
        self._handle, self._disk = handle, disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._handle.flush()
        room = self._disk.free()
        if fcntl.fcntl(self._handle.fileno(), fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            room -= room % safetensors_io.DIRECT_ALIGN  # direct writes fill whole blocks, as a kernel's
        if len(view) > room:
            self._handle.write(view[: max(room, 0)])
            self._handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._handle.name)
        return self._handle.write(view)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __enter__(self) -> QuotaFile:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


@pytest.fixture(params=["tmpfs", "emulated"])
def disk(request, tmp_path, monkeypatch):
    small = SmallDisk(tmp_path / "disk", request.param, monkeypatch)
    yield small
    small.unmount()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An fp32 Llama whose 8-expert sparse upcycling is about 3.3 MB (6.6 MB with 16 experts)."""
    folder = tmp_path_factory.mktemp("disk_source") / "dense"
    build_hf_model(
        "llama", vocab_size=256, hidden_size=64, intermediate_size=256, num_attention_heads=4
    ).save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return folder


def convert_yaml(folder: Path, source: Path, experts: int) -> Path:
    path = folder / f"e{experts}.yaml"
    path.write_text(yaml.safe_dump({"recipe": "sparse", "sources": [str(source)], "num_experts": experts}))
    return path


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    """The 8-expert conversion written on an ordinary disk, to compare against."""
    folder = tmp_path_factory.mktemp("disk_reference")
    return upcycle.convert(convert_yaml(folder, source, 8), folder / "out")


def leftovers(folder: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}"))


def sizes_in(message: str) -> tuple[float, float]:
    """The needed and the free size (in MB) that a disk-space refusal names."""
    needed = re.search(r"needs about ([\d.]+) MB", message)
    free = re.search(r"only ([\d.]+) MB are free", message)
    assert needed and free, message
    return float(needed.group(1)), float(free.group(1))


def test_refused_up_front_when_the_estimate_exceeds_free_space(disk, source, tmp_path, monkeypatch):
    # About 4.4 MB (3.3 MB of tensors + 1 MiB of slack) fits in 8 MiB, but not with the 64 MiB
    # safety margin: the message names the margin too.
    result = run_cli("convert", convert_yaml(tmp_path, source, 8), disk.path / "out", "--quiet")
    assert_refused(result, "MB plus a 67.11 MB safety margin", "free some space or choose another OUT_DIR")
    needed, free = sizes_in(result.stderr)
    assert 4.0 < needed < 5.0 and 8.0 < free <= 8.39, (needed, free)
    assert sorted(p.name for p in disk.path.iterdir()) == []

    monkeypatch.setattr(engine, "DISK_MARGIN_BYTES", 0)  # now the estimate alone is too large
    result = run_cli("convert", convert_yaml(tmp_path, source, 32), disk.path / "out", "--quiet")
    assert_refused(result, "are free under", str(disk.path))
    needed, free = sizes_in(result.stderr)
    assert needed > 13.0 and free <= 8.39, (needed, free)
    assert sorted(p.name for p in disk.path.iterdir()) == []


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
@pytest.mark.parametrize("leave", [0, 0.4, 0.98], ids=["full", "at_40pct", "at_98pct"])
def test_disk_fills_up_mid_write(disk, source, reference, tmp_path, monkeypatch, overwrite, leave, direct):
    """The estimate passes, then the disk fills up to `leave` × the output size; the write fails.
    `direct`: the shards are written with O_DIRECT (large shards are; here every shard, through
    a 64 KiB buffer), and the disk fills up under a direct write."""
    out = disk.path / "out"
    monkeypatch.setattr(engine, "DISK_MARGIN_BYTES", 0)  # a few MB could never pass the real margin
    opened = []
    if direct:
        if not safetensors_io.direct_io_supported(disk.path):
            pytest.skip(f"the {disk.backend} disk refuses O_DIRECT on this kernel")
        monkeypatch.setattr(safetensors_io, "DIRECT_MIN_BYTES", 0)
        monkeypatch.setattr(safetensors_io, "DIRECT_BUFFER_BYTES", 64 * 1024)
        real_direct_open = safetensors_io._DirectFile.open.__func__
        monkeypatch.setattr(
            safetensors_io._DirectFile,
            "open",
            classmethod(lambda cls, path: opened.append(path) or real_direct_open(cls, path)),
        )
    if overwrite:
        upcycle.convert(convert_yaml(tmp_path, source, 2), out)
        previous = folder_digest(out)
    real_check = engine.check_disk_space

    def check_then_fill(out_dir: Path, needed: int) -> None:
        real_check(out_dir, needed)
        disk.fill(int(leave * folder_bytes(reference)))

    monkeypatch.setattr(engine, "check_disk_space", check_then_fill)
    flags = ["--overwrite"] if overwrite else []
    result = run_cli("convert", convert_yaml(tmp_path, source, 8), out, "--quiet", *flags)
    assert_refused(result, "disk full while writing", "No space left on device", "free some space")
    if overwrite:
        assert folder_digest(out) == previous, "the previous complete output was damaged"
    else:
        assert not out.exists(), "a partial output folder was left"
    assert leftovers(disk.path) == [], "a staging folder was left"

    disk.unfill()  # the space of the removed partial output is really free again
    kept = folder_bytes(out) if overwrite else 0
    assert disk.free() >= CAPACITY - kept - 256 * 1024, (disk.backend, disk.free())

    monkeypatch.setattr(engine, "check_disk_space", real_check)
    assert run_cli("convert", convert_yaml(tmp_path, source, 8), out, "--quiet", *flags).returncode == 0
    assert folder_digest(out) == folder_digest(reference)
    assert leftovers(disk.path) == []
    assert bool(opened) == direct  # the direct variant wrote direct, the buffered one did not


def test_init_on_a_full_disk(disk, tmp_path):
    """`upcycle init` writes a native checkpoint (about 13 MB here) with no preflight: it fails
    mid-write, cleanly."""
    model = tmp_path / "model.yaml"
    model.write_text(
        yaml.safe_dump(
            {
                "vocab_size": 8192,
                "hidden_size": 192,
                "intermediate_size": 256,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
            }
        )
    )
    result = run_cli("init", model, disk.path / "fresh")
    assert_refused(result, "disk full while writing", "fresh", "free some space")
    assert sorted(p.name for p in disk.path.iterdir()) == []
    assert disk.free() >= CAPACITY - 64 * 1024


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EXDEV], ids=["ENOSYS", "EXDEV"])
def test_filesystem_without_rename(source, tmp_path, monkeypatch, code, overwrite):
    out = tmp_path / "out"
    if overwrite:
        upcycle.convert(convert_yaml(tmp_path, source, 2), out)
        previous = folder_digest(out)

    def no_rename(src, dst, *args, **kwargs):
        raise OSError(code, os.strerror(code), os.fsdecode(src))

    monkeypatch.setattr(os, "rename", no_rename)
    flags = ["--overwrite"] if overwrite else []
    result = run_cli("convert", convert_yaml(tmp_path, source, 8), out, "--quiet", *flags)
    assert_refused(result, "renaming a folder failed", os.strerror(code), "local disk")
    if overwrite:
        assert folder_digest(out) == previous
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_rename_failing_after_the_old_output_moved_aside(source, reference, tmp_path, monkeypatch):
    """Overwrite renames the old output aside, then the new one into place; if the second rename
    fails the old output must come back under its name at once."""
    out = tmp_path / "out"
    upcycle.convert(convert_yaml(tmp_path, source, 2), out)
    previous = folder_digest(out)
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if ".staging-" in Path(src).name and "-old-" not in Path(src).name:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), os.fsdecode(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    result = run_cli("convert", convert_yaml(tmp_path, source, 8), out, "--quiet", "--overwrite")
    assert_refused(result, "renaming a folder failed", "Invalid cross-device link")
    assert folder_digest(out) == previous
    assert leftovers(tmp_path) == []
