"""Direct-I/O shard writing (`safetensors_io._DirectFile`): the same bytes as a buffered write.

Large shards are written with O_DIRECT through an aligned buffer, whole buffers at a time, and the
tail with O_DIRECT cleared. These tests shrink the thresholds (a shard of any size goes direct, a
buffer of 16 KiB) so that small tensors cross many buffer boundaries, and compare the files byte
for byte with the buffered writer's. They also check the fallbacks: O_DIRECT refused at open or
at the first write, a refusal after data reached the disk (an error, not a silent switch), short
writes, and that every direct write is a whole buffer (so no write depends on the device's block
size). Disk-full during a direct write is in tests/test_disk_full.py.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import os
import warnings
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


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


class RawWrapper:
    """The raw file `_DirectFile` writes through, with its `write` replaced by `on_write(raw, data)`."""

    def __init__(self, raw, on_write) -> None:
        self._raw, self._on_write, self.writes = raw, on_write, []

    def write(self, data):
        self.writes.append((len(memoryview(data).cast("B")), is_direct(self._raw.fileno())))
        return self._on_write(self._raw, data)

    def __getattr__(self, name):
        return getattr(self._raw, name)


def wrap_direct_files(monkeypatch, on_write) -> list[RawWrapper]:
    """Every file opened for direct writes gets a RawWrapper; returns them as they are made."""
    real_open, made = open, []

    def opening(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if kwargs.get("opener"):
            made.append(RawWrapper(handle, on_write))
            return made[-1]
        return handle

    monkeypatch.setattr(st, "open", opening, raising=False)
    return made


def refusing(code: int, after: int, direct_only: bool):
    """Writes fail with `code` from the `after`-th on (0: the first), only those made with
    O_DIRECT set if `direct_only` (as a filesystem refusing direct I/O does)."""
    count = [0]

    def on_write(raw, data):
        if not direct_only or is_direct(raw.fileno()):
            if count[0] >= after:
                raise OSError(code, os.strerror(code))
            count[0] += 1
        return raw.write(data)

    return on_write


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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
    "sizes", [[BUFFER * 3], [5]], ids=["larger-than-the-buffer", "smaller-than-the-buffer"]
)
def test_direct_writes_refused_fall_back_to_buffered(tmp_path, small_direct, monkeypatch, sizes):
    """A filesystem that takes O_DIRECT at open but refuses direct writes (EINVAL): the file is
    written buffered, all of it is on disk when fsync runs, and no descriptor is left open."""
    state = tensors(sizes)
    synced = []  # the file's size as the OS had it when fsync ran: all of it, not what Python held back
    real_fsync = os.fsync
    fds = open_fds()
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)  # a file left for the collector to close
        wrapped = wrap_direct_files(m, refusing(errno.EINVAL, after=0, direct_only=True))
        m.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), real_fsync(fd)))
        direct = write(tmp_path / "direct", state, 1 << 30, True, monkeypatch)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert open_fds() == fds
    assert digests(direct) == digests(write(tmp_path / "buffered", state, 1 << 30, False, monkeypatch))
    assert synced == [(direct / st.SINGLE_NAME).stat().st_size]
    assert len(wrapped) == 1


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("at", ["a-full-buffer", "the-tail"])
def test_a_refusal_after_data_reached_the_disk_is_an_error(tmp_path, small_direct, monkeypatch, code, at):
    state = tensors([BUFFER * 5])
    size = (write(tmp_path / "buffered", state, 1 << 30, False, monkeypatch) / st.SINGLE_NAME).stat().st_size
    full_buffers = size // BUFFER
    assert size % BUFFER and full_buffers > 3
    (tmp_path / "out").mkdir()
    fds = open_fds()
    after = 2 if at == "a-full-buffer" else full_buffers
    wrapped = wrap_direct_files(monkeypatch, refusing(code, after=after, direct_only=False))
    with pytest.raises(OSError) as raised:
        st.save_tensors(tmp_path / "out", state)
    assert raised.value.errno == code
    assert open_fds() == fds
    # (the writer's cleanup may try the buffer again, through the page cache, and fail again)
    assert [direct for _, direct in wrapped[0].writes][: after + 1] == [True] * after + [
        at == "a-full-buffer"
    ]


def test_every_direct_write_is_a_whole_buffer_and_fsync_sees_the_file(tmp_path, small_direct, monkeypatch):
    """Direct writes are whole buffers (so a device whose blocks are larger than 4096 bytes takes
    them too); the tail goes with O_DIRECT cleared; fsync runs once, on the complete file."""
    state = tensors([BUFFER * 4 + 3])
    synced = []
    real_fsync = os.fsync
    with monkeypatch.context() as m:
        wrapped = wrap_direct_files(m, lambda raw, data: raw.write(data))
        m.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), real_fsync(fd)))
        direct = write(tmp_path / "direct", state, 1 << 30, True, monkeypatch)
    size = (direct / st.SINGLE_NAME).stat().st_size
    assert synced == [size]
    writes = wrapped[0].writes
    assert writes[:-1] == [(BUFFER, True)] * (size // BUFFER)
    assert writes[-1] == (size % BUFFER, False)
    assert digests(direct) == digests(write(tmp_path / "buffered", state, 1 << 30, False, monkeypatch))


@pytest.mark.parametrize("short", ["aligned", "unaligned"])
def test_short_direct_writes(tmp_path, small_direct, monkeypatch, short):
    """A direct write that returns less than asked: an aligned count continues directly, an
    unaligned one (emulated: O_DIRECT cleared for that write) ends direct writing for the file.
    Either way the file holds the same bytes as a buffered write."""

    def on_write(raw, data):
        view = memoryview(data).cast("B")
        if not is_direct(raw.fileno()) or len(view) <= 2 * st.DIRECT_ALIGN:
            return raw.write(view)
        if short == "aligned":
            return raw.write(view[: len(view) // 2 // st.DIRECT_ALIGN * st.DIRECT_ALIGN])
        flags = fcntl.fcntl(raw.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(raw.fileno(), fcntl.F_SETFL, flags & ~os.O_DIRECT)
        written = raw.write(view[:100])
        fcntl.fcntl(raw.fileno(), fcntl.F_SETFL, flags)
        return written

    state = tensors([BUFFER * 3 + 7])
    with monkeypatch.context() as m:
        wrapped = wrap_direct_files(m, on_write)
        direct = write(tmp_path / "direct", state, 1 << 30, True, monkeypatch)
    assert digests(direct) == digests(write(tmp_path / "buffered", state, 1 << 30, False, monkeypatch))
    modes = [direct for _, direct in wrapped[0].writes]
    if short == "aligned":
        assert modes[:-1] == [True] * (len(modes) - 1) and not modes[-1]
    else:
        assert modes[0] and not any(modes[1:])


def test_large_shards_have_the_permissions_of_small_ones(tmp_path, small_direct, monkeypatch):
    old = os.umask(0o002)
    try:
        direct = write(tmp_path / "direct", tensors([BUFFER]), 1 << 30, True, monkeypatch)
        buffered = write(tmp_path / "buffered", tensors([BUFFER]), 1 << 30, False, monkeypatch)
    finally:
        os.umask(old)
    modes = {(f / st.SINGLE_NAME).stat().st_mode & 0o777 for f in (direct, buffered)}
    assert modes == {0o664}


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
