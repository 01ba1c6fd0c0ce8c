"""`manifest.json`: the description of a prepared data folder, and its fingerprint.

The manifest is the only metadata a reader needs: shard files with token counts per domain and
split, the dtype, the tokenizer's hash and separator ids, and the sources (path, size, mtime)
they came from. `fingerprint` is a sha256 over everything that determines the shard bytes
(sources' stat values, tokenizer hash, separators, held-out rule, seed, shard size, format
version) and nothing else: mixture weights and worker counts are left out, so changing them
does not force a re-tokenisation. `prepare_data` compares fingerprints to skip work that is
already done.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from upcycle.data.config import HeldoutConfig
from upcycle.data.shards import TokenStream
from upcycle.errors import UpcycleError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
Split = Literal["train", "heldout"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardRecord(_Record):
    file: str  # relative to the prepared folder
    tokens: int


class SplitRecord(_Record):
    tokens: int
    documents: int
    shards: list[ShardRecord]


class SourceRecord(_Record):
    path: str
    format: str
    size_bytes: int
    mtime_ns: int
    documents: int


class DomainRecord(_Record):
    weight: float
    sources: list[SourceRecord]
    empty_documents_skipped: int
    train: SplitRecord
    heldout: SplitRecord


class TokenizerRecord(_Record):
    path: str
    sha256: str
    id_upper_bound: int


class Manifest(_Record):
    """A prepared data folder. `root` is where it was loaded from (not stored in the file)."""

    format_version: int
    upcycle_version: str
    fingerprint: str
    dtype: Literal["uint16", "uint32"]
    tokenizer: TokenizerRecord
    eos_token: str
    eos_id: int
    bos_token: str | None
    bos_id: int | None
    seed: int
    heldout: HeldoutConfig
    max_tokens_per_shard: int
    domains: dict[str, DomainRecord]
    _root: Path | None = PrivateAttr(None)

    @property
    def root(self) -> Path:
        if self._root is None:
            raise RuntimeError("this manifest was not loaded from a folder; use load_manifest()")
        return self._root

    def split(self, domain: str, split: Split) -> SplitRecord:
        if domain not in self.domains:
            raise UpcycleError(
                f"domain {domain!r} is not in the data at {self._root} (it has: "
                f"{', '.join(self.domains)}); use one of those names"
            )
        return getattr(self.domains[domain], split)

    def token_stream(self, domain: str, split: Split) -> TokenStream:
        """The tokens of one domain split, memory-mapped, as one stream."""
        record = self.split(domain, split)
        return TokenStream(
            [self.root / shard.file for shard in record.shards],
            [shard.tokens for shard in record.shards],
            self.dtype,
        )

    def default_weights(self) -> dict[str, float]:
        return {name: domain.weight for name, domain in self.domains.items()}


def fingerprint_of(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `parts` (sorted keys, no whitespace)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(manifest: Manifest, folder: Path) -> None:
    path = Path(folder) / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as file:
        file.write(manifest.model_dump_json(indent=2) + "\n")
        file.flush()
        os.fsync(file.fileno())


def load_manifest(folder: Path | str, check_shards: bool = True) -> Manifest:
    """Read `folder/manifest.json`; with `check_shards`, refuse missing or truncated shard files."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise UpcycleError(f"{folder} holds no {MANIFEST_NAME}; run prepare_data into it first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UpcycleError(f"{path} is not valid JSON ({error}); re-run prepare_data") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise UpcycleError(
            f"{path} has data format version {version}, this upcycle reads version {FORMAT_VERSION}; "
            "re-run prepare_data with this version"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UpcycleError(f"{path} is malformed at {where} ({first['msg']}); re-run prepare_data") from None
    manifest._root = folder.resolve()
    if check_shards:
        for name in manifest.domains:
            manifest.token_stream(name, "train")
            manifest.token_stream(name, "heldout")
    return manifest
