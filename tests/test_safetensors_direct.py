"""Direct-I/O shard writing (`safetensors_io._DirectFile`): the same bytes as a buffered write.

Large shards are written with O_DIRECT through an aligned buffer, the unaligned tail padded and
the file cut back to its length. These tests shrink the thresholds (a shard of any size goes
direct, a buffer of 16 KiB) so that small tensors cross many buffer boundaries, and compare the
files byte for byte with the buffered writer's. They also check the fallbacks: O_DIRECT refused at
open, refused at the first write, and a refusal after data reached the disk (an error, not a
silent switch). Disk-full during a direct write is in tests/test_disk_full.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from upcycle.checkpoint import safetensors_io as st

pytestmark = pytest.mark.skipif(not st.DIRECT_IO, reason="this OS has no O_DIRECT")

BUFFER = 16 * 1024


@pytest.fixture
def small_direct(monkeypatch, tmp_path):
    if not st.direct_io_supported(tmp_path):
        pytest.skip("the test folder's filesystem refuses O_DIRECT")
    monkeypatch.setattr(st, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(st, "DIRECT_BUFFER_BYTES", BUFFER)
    opened: list[Path] = []
    real = st._DirectFile.open.__func__

    def counting(cls, path):
        handle = real(cls, path)
        if handle is not None:
            opened.append(path)
        return handle

    monkeypatch.setattr(st._DirectFile, "open", classmethod(counting))
    return opened


def tensors(sizes: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"t{i}": torch.randn(n, generator=g).to(torch.bfloat16) for i, n in enumerate(sizes)}
    out["ids"] = torch.arange(11, dtype=torch.int64)  # another dtype, 88 bytes
    return out


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def write(
    folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int, direct: bool, monkeypatch
) -> Path:
    folder.mkdir()
    with monkeypatch.context() as m:
        if not direct:
            m.setattr(st, "DIRECT_MIN_BYTES", 1 << 62)
        st.save_tensors(folder, state, max_shard_bytes=max_shard_bytes)
    return folder


@pytest.mark.parametrize(
    "sizes, shard_bytes",
    [
        ([3, 7], 1 << 30),  # header and all smaller than one block
        ([BUFFER // 2 - 4], 1 << 30),  # the header plus the tensor fill the buffer exactly or nearly
        ([BUFFER * 3 + 5, 1, BUFFER // 2, 40_000], 1 << 30),  # tensors larger than the buffer
        ([2048] * 40, 1 << 30),  # many tensors, the tail on a block boundary or not
        ([10_000, 30_000, 5, 70_000, 12_345], 60_000),  # several shards and an index
        ([0, 5, 0], 1 << 30),  # empty tensors
    ],
)
def test_direct_files_equal_buffered_files(tmp_path, small_direct, monkeypatch, sizes, shard_bytes):
    state = tensors(sizes)
    direct = write(tmp_path / "direct", state, shard_bytes, True, monkeypatch)
    buffered = write(tmp_path / "buffered", state, shard_bytes, False, monkeypatch)
    assert digests(direct) == digests(buffered)
    shards = [p for p in direct.iterdir() if p.suffix == ".safetensors"]
    assert sorted(small_direct) == sorted(shards)  # every shard went direct, none fell back
    reader = st.SafetensorsReader(direct)
    assert all(torch.equal(reader.get(name), t) for name, t in state.items())


def test_exact_buffer_multiple(tmp_path, small_direct, monkeypatch):
    """A file whose length is a whole number of buffers: no tail write, no truncation needed."""
    probe_n = 10_000  # as many digits as the tensor below, so the header has the same length
    probe = {"x": torch.zeros(probe_n, dtype=torch.uint8)}
    probe_file = write(tmp_path / "probe", probe, 1 << 30, False, monkeypatch) / st.SINGLE_NAME
    header = probe_file.stat().st_size - probe_n  # the 8-byte length and the JSON
    state = {"x": torch.arange(2 * BUFFER - header, dtype=torch.int64).to(torch.uint8)}
    direct = write(tmp_path / "direct", state, 1 << 30, True, monkeypatch)
    buffered = write(tmp_path / "buffered", state, 1 << 30, False, monkeypatch)
    assert (direct / st.SINGLE_NAME).stat().st_size == 2 * BUFFER
    assert digests(direct) == digests(buffered)


class RefusingWrites:
    """A raw file whose writes fail with `code` from the `after`-th write on (0: the first)."""

    def __init__(self, raw, code: int, after: int) -> None:
        self._raw, self._code, self._after, self.writes = raw, code, after, 0

    def write(self, data):
        if self.writes >= self._after:
            raise OSError(self._code, os.strerror(self._code))
        self.writes += 1
        return self._raw.write(data)

    def __getattr__(self, name):
        return getattr(self._raw, name)


def refuse_direct_writes(monkeypatch, code: int, after: int) -> None:
    real_open = open

    def opening(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return RefusingWrites(handle, code, after) if kwargs.get("opener") else handle

    monkeypatch.setattr(st, "open", opening, raising=False)


def test_open_refusing_o_direct_writes_buffered(tmp_path, small_direct, monkeypatch):
    state = tensors([BUFFER * 2, 9])
    real_os_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused")
        return real_os_open(path, flags, *args)

    with monkeypatch.context() as m:
        m.setattr(os, "open", no_direct)
        direct = write(tmp_path / "direct", state, 1 << 30, True, monkeypatch)
    assert small_direct == []
    assert digests(direct) == digests(write(tmp_path / "buffered", state, 1 << 30, False, monkeypatch))


@pytest.mark.parametrize(
    "sizes", [[BUFFER * 3], [5]], ids=["refused-at-a-full-buffer", "refused-at-the-tail"]
)
def test_first_direct_write_refused_falls_back_to_buffered(tmp_path, small_direct, monkeypatch, sizes):
    state = tensors(sizes)
    synced = []  # the file's size as the OS had it when fsync ran: all of it, not what Python held back
    real_fsync = os.fsync
    with monkeypatch.context() as m:
        refuse_direct_writes(m, errno.EINVAL, after=0)
        m.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), real_fsync(fd)))
        direct = write(tmp_path / "direct", state, 1 << 30, True, monkeypatch)
    assert digests(direct) == digests(write(tmp_path / "buffered", state, 1 << 30, False, monkeypatch))
    assert synced == [(direct / st.SINGLE_NAME).stat().st_size]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSPC, errno.EIO])
def test_a_refusal_after_data_reached_the_disk_is_an_error(tmp_path, small_direct, monkeypatch, code):
    (tmp_path / "out").mkdir()
    refuse_direct_writes(monkeypatch, code, after=2)
    with pytest.raises(OSError) as raised:
        st.save_tensors(tmp_path / "out", tensors([BUFFER * 5]))
    assert raised.value.errno == code


def test_a_short_unaligned_write_is_an_error(tmp_path, small_direct, monkeypatch):
    class Short:
        def __init__(self, raw):
            self._raw = raw

        def write(self, data):
            return self._raw.write(memoryview(data)[: st.DIRECT_ALIGN]) - 1  # claims one byte less

        def __getattr__(self, name):
            return getattr(self._raw, name)

    real_open = open
    monkeypatch.setattr(
        st,
        "open",
        lambda f, mode="r", *a, **k: (
            Short(real_open(f, mode, *a, **k)) if k.get("opener") else real_open(f, mode, *a, **k)
        ),
        raising=False,
    )
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="direct write"):
        st.save_tensors(tmp_path / "out", tensors([BUFFER * 2]))


def test_large_shards_go_direct_by_default(tmp_path, monkeypatch):
    """The default threshold: a shard below DIRECT_MIN_BYTES is buffered, one at it is direct."""
    if not st.direct_io_supported(tmp_path):
        pytest.skip("the test folder's filesystem refuses O_DIRECT")
    monkeypatch.setattr(st, "DIRECT_MIN_BYTES", 1 << 20)
    opened = []
    real = st._DirectFile.open.__func__
    monkeypatch.setattr(st._DirectFile, "open", classmethod(lambda cls, p: opened.append(p) or real(cls, p)))
    small = {"x": torch.zeros((1 << 20) // 2 - 1, dtype=torch.bfloat16)}
    large = {"x": torch.zeros((1 << 20) // 2, dtype=torch.bfloat16)}
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    st.save_tensors(tmp_path / "small", small)
    st.save_tensors(tmp_path / "large", large)
    assert opened == [tmp_path / "large" / st.SINGLE_NAME]
