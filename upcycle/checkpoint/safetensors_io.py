"""Safetensors read and written by us: validated headers, one tensor at a time.

Reading parses and checks the header before any tensor is touched (header size, offsets inside
the file and not overlapping, byte sizes that agree with dtype × shape), so a truncated or hostile
file is refused with a clear sentence instead of a crash or a huge allocation. Tensors are read
lazily, one `read` per tensor.

Writing is planned: the caller gives every (name, dtype, shape) first, the writer assigns them to
shards and writes each shard's header up front, then streams each tensor's bytes as it arrives.
Memory therefore stays at one tensor, whatever the model size.

Large shards (≥ `DIRECT_MIN_BYTES`) are written with direct I/O where the OS and filesystem allow
it (Linux `O_DIRECT`): bytes go from an aligned buffer to the disk without passing through the
page cache. On the 2-core CI machine a buffered write of a few GB costs about 2.5 s of kernel time
per GB (page-cache copies, dirty-page accounting, writeback), more than the disk itself takes, and
leaves the cache full of pages nobody reads; direct writes of the same bytes took a tenth of the
CPU and ran at the disk's speed (bench/RESULTS.md, fourteenth round, "Conversion with direct writes"). The file's bytes
are the same either way (tests/test_safetensors_direct.py); where direct I/O is refused (some
filesystems: tmpfs before Linux 6.6, several network and FUSE ones; macOS has no O_DIRECT) the
shard is written buffered, as small shards are.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.errors import UpcycleError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
# Linux: every 64 MiB written, posix_fadvise(DONTNEED) starts their writeback at once, so the
# final fsync finds little left to do and the cache is not filled with pages we never read.
ADVISE_DONTNEED = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")
ADVISE_EVERY_BYTES = 64 * 1024**2
SINGLE_NAME = "model.safetensors"
# Direct I/O (see the module docstring): shards of at least this many bytes, written through an
# aligned buffer of DIRECT_BUFFER_BYTES (a multiple of any block size a device uses); a direct
# write that returns a count not a multiple of DIRECT_ALIGN ends direct writing for that file.
DIRECT_IO = hasattr(os, "O_DIRECT")
DIRECT_MIN_BYTES = 64 * 1024**2
DIRECT_BUFFER_BYTES = 8 * 1024**2
DIRECT_ALIGN = 4096


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in the file
    nbytes: int


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object as a dict, refusing a key given twice (json.loads would keep the last)."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns its entries and metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise UpcycleError(f"{path} is truncated (shorter than a safetensors header); re-download it")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise UpcycleError(
                    f"{path} declares a {header_len}-byte header, over the 100 MB limit; "
                    "the file is corrupt or hostile, re-create it"
                )
            if 8 + header_len > size:
                raise UpcycleError(
                    f"{path} is truncated: its header needs {8 + header_len} bytes but the file has {size}; "
                    "re-download or re-create it"
                )
            raw = handle.read(header_len)
    except OSError as error:
        raise UpcycleError(f"cannot read {path}: {error.strerror}; check the path and permissions") from error
    try:
        header = json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKeyError as error:
        raise UpcycleError(
            f"{path} has a safetensors header that names {error.key!r} twice, so which entry counts "
            "is ambiguous; the file is corrupt or hostile, re-create it"
        ) from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UpcycleError(
            f"{path} has an unreadable safetensors header; the file is corrupt, re-create it"
        ) from error
    if not isinstance(header, dict):
        raise UpcycleError(f"{path} has a malformed safetensors header; the file is corrupt, re-create it")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UpcycleError(f"{path} has a malformed __metadata__ entry; the file is corrupt, re-create it")
    data_start = 8 + header_len
    data_len = size - data_start
    entries = {name: _check_entry(path, name, info, data_start, data_len) for name, info in header.items()}
    _check_no_overlap(path, entries.values())
    return entries, metadata


def _check_entry(path: Path, name: str, info: object, data_start: int, data_len: int) -> TensorEntry:
    def bad(reason: str) -> UpcycleError:
        return UpcycleError(f"{path}: tensor {name!r} {reason}; the file is corrupt, re-create it")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise bad("has a malformed header entry")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise bad(f"has unsupported dtype {info['dtype']!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad("has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise bad("has invalid data offsets")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad("has invalid data offsets")
    if end > data_len:
        raise UpcycleError(
            f"{path} is truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte data section; "
            "re-download or re-create it"
        )
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise bad(f"holds {end - begin} bytes but dtype {info['dtype']} × shape {shape} needs {expected}")
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_no_overlap(path: Path, entries: Iterable[TensorEntry]) -> None:
    previous_end, previous_name = -1, ""
    for entry in sorted(entries, key=lambda e: (e.begin, e.nbytes)):
        if entry.nbytes and entry.begin < previous_end:
            raise UpcycleError(
                f"{path}: tensors {previous_name!r} and {entry.name!r} overlap; the file is corrupt, re-create it"
            )
        if entry.nbytes:
            previous_end, previous_name = entry.begin + entry.nbytes, entry.name


def read_into(entry: TensorEntry, out: torch.Tensor) -> torch.Tensor:
    """Read one tensor's bytes from disk straight into `out` (contiguous, same dtype and size).

    The bytes land in `out`'s own storage: no zero-filled staging buffer, no second copy. That
    matters on a machine whose page cache is full of what a conversion just wrote, where every
    fresh page of a staging buffer faults and waits for reclaim (bench/RESULTS.md, conversion).
    """
    if (
        out.dtype != entry.dtype
        or out.numel() * out.element_size() != entry.nbytes
        or not out.is_contiguous()
    ):
        raise RuntimeError(
            f"read_into: {entry.name!r} does not fit a {out.dtype} tensor of shape {tuple(out.shape)}"
        )
    if entry.nbytes == 0:
        return out
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(entry.file, "rb", buffering=0) as handle:
        handle.seek(entry.begin)
        done = 0
        while done < entry.nbytes:  # one read returns at most ~2 GB on Linux
            count = handle.readinto(view[done:])
            if not count:
                raise UpcycleError(
                    f"{entry.file} is truncated at tensor {entry.name!r}; re-download or re-create it"
                )
            done += count
    return out


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's bytes from disk into a fresh CPU tensor."""
    return read_into(entry, torch.empty(entry.shape, dtype=entry.dtype))


def row_range(entry: TensorEntry, start: int, stop: int) -> TensorEntry:
    """The entry of rows [start, stop) of a tensor (first dimension): their bytes only."""
    row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
    return TensorEntry(
        entry.name,
        entry.dtype,
        (stop - start, *entry.shape[1:]),
        entry.file,
        entry.begin + start * row_bytes,
        (stop - start) * row_bytes,
    )


def read_tensor_rows(entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor (first dimension), reading only their bytes."""
    return read_tensor(row_range(entry, start, stop))


class SafetensorsReader:
    """Lazy access to the tensors of a checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        for file in self._files():
            entries, metadata = read_header(file)
            self.entries.update(entries)
            self.metadata.update(metadata)

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise UpcycleError(f"{index} is not a valid safetensors index; re-create it") from error
            if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
                for name in weight_map.values()
            ):
                raise UpcycleError(
                    f"{index} must map tensor names to shard file names in the same folder; re-create it"
                )
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (self.folder / name).is_file()]
            if missing:
                raise UpcycleError(
                    f"{self.folder} is missing shard {missing[0]} named in its index; copy the whole checkpoint"
                )
            return [self.folder / name for name in files]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UpcycleError(f"{self.folder} holds no .safetensors file; point to a checkpoint folder")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self.entries[name])

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return read_tensor_rows(self.entries[name], start, stop)

    def read_into(
        self, name: str, out: torch.Tensor, start: int | None = None, stop: int | None = None
    ) -> None:
        """Tensor `name` (or its rows [start, stop)) read straight into `out`."""
        entry = self.entries[name]
        read_into(entry if start is None else row_range(entry, start, stop), out)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, entry in self.entries.items():
            yield name, read_tensor(entry)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split the planned tensors, in order, into shards of at most `max_shard_bytes` (one tensor
    larger than that gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


class StreamingWriter:
    """Writes planned tensors into safetensors shards as they arrive, in plan order.

    Use as a context manager inside an atomic output folder; `write(name, tensor)` must follow
    the plan's order exactly (so each shard's header, written first, is right).
    """

    def __init__(
        self,
        folder: Path,
        plan: list[PlannedTensor],
        max_shard_bytes: int = 2**31,
        metadata: dict | None = None,
    ) -> None:
        self.folder = folder
        self.shards = plan_shards(plan, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        count = len(self.shards)
        self.file_names = (
            [SINGLE_NAME]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = [(shard_index, t) for shard_index, shard in enumerate(self.shards) for t in shard]
        self._position = 0
        self._handle = None
        self._open_shard = -1

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            with contextlib.suppress(OSError):  # e.g. the disk is full: keep the first error
                self._close_handle()
            return
        self._close_handle()
        if self._position != len(self._order):
            raise RuntimeError(f"StreamingWriter closed after {self._position} of {len(self._order)} tensors")
        self._write_index()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, planned = self._order[self._position]
        if name != planned.name:
            raise RuntimeError(f"tensor {name!r} written out of plan order (expected {planned.name!r})")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned {planned.dtype} {planned.shape}"
            )
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._advise()
        self._position += 1

    def _advise(self) -> None:
        """posix_fadvise(DONTNEED) over what was written since the last advice, once 64 MiB have
        gathered (the fsync at the end of the shard takes the rest): each call drains per-CPU
        page lists, which costs more than the advice itself when made per small tensor."""
        if not ADVISE_DONTNEED or (isinstance(self._handle, _DirectFile) and self._handle.direct):
            return  # direct writes leave no pages in the cache
        self._handle.flush()
        end = self._handle.tell()
        if end - self._advised_upto >= ADVISE_EVERY_BYTES:
            os.posix_fadvise(
                self._handle.fileno(), self._advised_upto, end - self._advised_upto, os.POSIX_FADV_DONTNEED
            )
            self._advised_upto = end

    def _start_shard(self, shard_index: int) -> None:
        self._close_handle()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for planned in self.shards[shard_index]:
            header[planned.name] = {
                "dtype": DTYPE_NAMES[planned.dtype],
                "shape": list(planned.shape),
                "data_offsets": [offset, offset + planned.nbytes],
            }
            offset += planned.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
        path = self.folder / self.file_names[shard_index]
        direct = DIRECT_IO and offset >= DIRECT_MIN_BYTES and _DirectFile.open(path)
        self._handle = direct or open(path, "wb")  # noqa: SIM115
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._open_shard = shard_index
        self._advised_upto = 0

    def _close_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            handle.close()  # always, so a failed write (full disk) releases the file

    def _write_index(self) -> None:
        if len(self.shards) == 1:
            return
        weight_map = {t.name: self.file_names[i] for i, shard in enumerate(self.shards) for t in shard}
        total = sum(t.nbytes for shard in self.shards for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def direct_io_supported(folder: Path) -> bool:
    """Whether files in `folder` can be opened for direct writes (its filesystem takes O_DIRECT)."""
    if not DIRECT_IO:
        return False
    probe = Path(folder) / f".direct-io-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


class _DirectFile:
    """A file written with O_DIRECT through an aligned buffer: `write`, `flush`, `fileno`, `tell`,
    `close`, as `StreamingWriter` uses a file object.

    Every direct write is a whole buffer (8 MiB: a multiple of any device's block size) at a
    multiple of the buffer's size from a page-aligned address, which is what O_DIRECT asks. The
    tail, shorter than a buffer, is written at `flush` after O_DIRECT is cleared from the file
    (`fcntl`), through the page cache like any buffered write; the fsync that follows covers it.
    So no write depends on the device's block size being 4096 or less, and the file holds exactly
    the bytes written. The file is opened with the builtin `open` (an `opener` adds O_DIRECT), so
    whatever wraps `open` sees it. If the filesystem refuses the first direct write (EINVAL), the
    file is reopened buffered and written as any other: nothing had reached it yet.
    """

    def __init__(self, path: Path, raw) -> None:
        self.path, self._raw = path, raw
        self._buffer = mmap.mmap(-1, DIRECT_BUFFER_BYTES)  # page-aligned
        self._view = memoryview(self._buffer)
        self._fill = 0  # bytes waiting in the buffer
        self._on_disk = 0  # bytes written to the file
        self._o_direct = True  # the descriptor still has O_DIRECT (cleared for the tail)
        self._buffered = None  # the fallback file object, once direct writes were refused

    @classmethod
    def open(cls, path: Path) -> _DirectFile | None:
        """The file opened for direct writes, or None where the OS or filesystem refuses O_DIRECT."""

        def direct(name, flags):
            return os.open(name, flags | os.O_DIRECT, 0o666)  # as `open` does: the umask decides

        try:
            raw = open(path, "wb", buffering=0, opener=direct)  # noqa: SIM115
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                return None
            raise
        return cls(path, raw)

    @property
    def direct(self) -> bool:
        """True while the file is written with O_DIRECT."""
        return self._buffered is None and self._o_direct

    def write(self, data) -> int:
        if self._buffered is not None:
            return self._buffered.write(data)
        view = memoryview(data).cast("B")
        taken = 0
        while taken < len(view):
            n = min(len(view) - taken, DIRECT_BUFFER_BYTES - self._fill)
            self._view[self._fill : self._fill + n] = view[taken : taken + n]
            self._fill += n
            taken += n
            if self._fill == DIRECT_BUFFER_BYTES:
                self._write_buffer()
                if self._buffered is not None:  # direct writes refused: the rest goes buffered
                    return taken + self._buffered.write(view[taken:])
        return taken

    def _write_buffer(self) -> None:
        """Write the buffer's `_fill` bytes at `_on_disk`. A direct write that returns a count the
        next one could not start from (not a multiple of DIRECT_ALIGN) ends direct writing: the
        rest of the file goes through the page cache."""
        done, length = 0, self._fill
        while done < length:
            try:
                n = self._raw.write(self._view[done:length])
            except OSError as error:
                if error.errno != errno.EINVAL or not self._o_direct or self._on_disk or done:
                    raise
                self._fall_back()
                return
            if not n:
                raise OSError(errno.EIO, f"a write of {length - done} bytes wrote nothing", str(self.path))
            done += n
            if self._o_direct and n % DIRECT_ALIGN and done < length:
                self._clear_o_direct()
        self._on_disk += length
        self._fill = 0

    def _clear_o_direct(self) -> None:
        import fcntl  # POSIX only, as O_DIRECT is

        fd = self._raw.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._o_direct = False

    def _fall_back(self) -> None:
        """The filesystem took O_DIRECT at open but refuses the writes: write this file buffered."""
        self._raw.close()
        self._buffered = open(self.path, "wb")  # noqa: SIM115
        self._buffered.write(self._view[: self._fill])
        self._fill = 0

    def flush(self) -> None:
        """Write what the buffer holds: the tail, shorter than a buffer, with O_DIRECT cleared (a
        direct write of it would have to be padded to the device's block size)."""
        if self._buffered is None and self._fill:
            if self._o_direct:
                self._clear_o_direct()
            self._write_buffer()
        if self._buffered is not None:  # also after falling back: fsync must see it all
            self._buffered.flush()

    def fileno(self) -> int:
        return (self._buffered or self._raw).fileno()

    def tell(self) -> int:
        return self._buffered.tell() if self._buffered is not None else self._on_disk + self._fill

    def close(self) -> None:
        try:
            (self._buffered or self._raw).close()
        finally:
            self._view.release()
            # a slice of the buffer can outlive a failed write (in its traceback): then the
            # mapping goes when the last one does
            with contextlib.suppress(BufferError):
                self._buffer.close()


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 2**31) -> None:
    """Write an in-memory state dict with the streaming writer (same format, same sharding)."""
    plan = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with StreamingWriter(folder, plan, max_shard_bytes) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
