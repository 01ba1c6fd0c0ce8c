"""Token shards: raw little-endian uint16/uint32 files, written in order, read as one stream.

A shard is a headerless array file (`np.memmap`-able); its dtype and token count live in the
manifest. Headerless because the writer does not know the final length when it starts, and
because any tool can map it. The reader checks every file's size against the manifest, so a
truncated or swapped shard is refused instead of yielding shifted tokens.

`TokenStream` joins one split's shards into one address space: position p is token p of the
domain split, whichever file it sits in. Memmaps are opened lazily and are not pickled, so a
stream can be sent to DataLoader worker processes without copying the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from upcycle.errors import UpcycleError

DEFAULT_MAX_TOKENS_PER_SHARD = 1 << 28  # 512 MiB of uint16: big enough to keep file counts low


@dataclass(frozen=True)
class WrittenShard:
    """A finished shard: its path relative to the prepared folder and its token count."""

    file: str
    tokens: int


class ShardWriter:
    """Appends token arrays to `{stem}-00000.bin`, `{stem}-00001.bin`, ... of bounded size."""

    def __init__(self, root: Path, stem: str, dtype: np.dtype, max_tokens_per_shard: int):
        self.root, self.stem, self.dtype = Path(root), stem, np.dtype(dtype)
        self.max_tokens_per_shard = max_tokens_per_shard
        self.shards: list[WrittenShard] = []
        self._file = None
        self._tokens_in_file = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<"))
        while tokens.size:
            if self._file is None:
                self._open_next()
            room = self.max_tokens_per_shard - self._tokens_in_file
            self._file.write(memoryview(tokens[:room]))
            self._tokens_in_file += min(room, tokens.size)
            tokens = tokens[room:]
            if self._tokens_in_file == self.max_tokens_per_shard:
                self._finish_file()

    def close(self) -> list[WrittenShard]:
        """Flush and fsync the last file; return every shard written."""
        if self._file is not None:
            self._finish_file()
        return self.shards

    def _open_next(self) -> None:
        relative = f"{self.stem}-{len(self.shards):05d}.bin"
        (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.root / relative, "wb")  # noqa: SIM115 - stays open across write() calls
        self._relative = relative
        self._tokens_in_file = 0

    def _finish_file(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards.append(WrittenShard(self._relative, self._tokens_in_file))
        self._file = None


class TokenStream:
    """Random access to the concatenated tokens of a list of shard files."""

    def __init__(self, paths: list[Path], token_counts: list[int], dtype: np.dtype):
        self.paths = [Path(p) for p in paths]
        self.token_counts = [int(n) for n in token_counts]
        self.dtype = np.dtype(dtype).newbyteorder("<")
        for path, count in zip(self.paths, self.token_counts, strict=True):
            expected = count * self.dtype.itemsize
            actual = path.stat().st_size if path.is_file() else None
            if actual != expected:
                raise UpcycleError(
                    f"shard {path} has {actual} bytes where the manifest promises {expected}; "
                    "re-run prepare_data into a fresh folder"
                )
        self.starts = np.concatenate([[0], np.cumsum(self.token_counts, dtype=np.int64)])
        self._maps: list[np.memmap] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as a fresh array, crossing shard boundaries as needed."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside a stream of {self.num_tokens}")
        maps = self._open()
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, position, shard = [], start, first
        while position < stop:
            offset = position - int(self.starts[shard])
            take = min(stop - position, self.token_counts[shard] - offset)
            pieces.append(maps[shard][offset : offset + take])
            position += take
            shard += 1
        if not pieces:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [
                np.memmap(path, dtype=self.dtype, mode="r", shape=(count,))
                for path, count in zip(self.paths, self.token_counts, strict=True)
            ]
        return self._maps

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}
