"""`prepare_data`: source files → token shards + manifest.json, written atomically.

Order of work, so that every refusal comes before any output exists:
1. load the tokenizer and resolve every domain's files (missing paths, unknown formats, a
   missing tokenizer are refused here);
2. fingerprint the inputs; if `out_dir` already holds data with that fingerprint, return it;
3. check free disk space; then, in a staging folder beside `out_dir`, per domain:
   a. tokenise every document in order into one working file, keeping document lengths;
   b. choose held-out documents (`split.choose_heldout_documents`);
   c. copy the documents, still in source order, into `train` and `heldout` shards;
4. write manifest.json and rename the staging folder onto `out_dir`.

Step (c) copies each domain's tokens once more. That costs a memory-bandwidth pass and, at
peak, one domain's worth of extra disk, but it lets the held-out split be an exact token
budget drawn from the whole domain, which a single streaming pass cannot do.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np

from upcycle import __version__
from upcycle.checkpoint.atomic import atomic_output_dir, remove_stale_staging
from upcycle.data.config import DataConfig, DomainConfig
from upcycle.data.encode import batched_documents, encode_packed, rust_threads
from upcycle.data.ingest import SourceFile, read_documents, resolve_sources
from upcycle.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    DomainRecord,
    Manifest,
    ShardRecord,
    SourceRecord,
    SplitRecord,
    TokenizerRecord,
    fingerprint_of,
    load_manifest,
    write_manifest,
)
from upcycle.data.progress import TokenizeProgress
from upcycle.data.shards import DEFAULT_MAX_TOKENS_PER_SHARD, ShardWriter, TokenStream
from upcycle.data.split import choose_heldout_documents
from upcycle.data.tokenizer import DataTokenizer, load_tokenizer
from upcycle.errors import UpcycleError

# Rough upper estimates for the disk preflight; Parquet is compressed, hence the larger figure.
_TOKENS_PER_SOURCE_BYTE = {"text": 0.35, "jsonl": 0.35, "parquet": 1.0}
_COPY_CHUNK_TOKENS = 1 << 24


def prepare_data(
    config: DataConfig,
    out_dir: Path | str,
    *,
    quiet: bool = False,
    force: bool = False,
    max_tokens_per_shard: int = DEFAULT_MAX_TOKENS_PER_SHARD,
) -> Manifest:
    """Tokenise every domain of `config` into `out_dir`; return its manifest.

    Skips the work when `out_dir` already holds data with the same fingerprint (unless `force`).
    Replaces `out_dir` only when it is absent, empty, or earlier prepared data.
    """
    if max_tokens_per_shard < 1:
        raise ValueError(f"max_tokens_per_shard must be ≥ 1, got {max_tokens_per_shard}")
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(config.tokenizer, config.eos_token, need_bos=config.add_bos)
    sources = {name: resolve_sources(name, domain) for name, domain in config.domains.items()}
    fingerprint = fingerprint_of(_fingerprint_parts(config, sources, tokenizer, max_tokens_per_shard))
    # What a killed run left beside out_dir goes first: its staging folder, or the previous
    # output it had moved aside (back under its name if the new one never arrived).
    remove_stale_staging(out_dir.absolute())
    if _holds_prepared_data(out_dir) and not force:
        try:
            existing = load_manifest(out_dir)
        except UpcycleError:
            existing = None  # broken earlier output: rebuild it
        if existing is not None and existing.fingerprint == fingerprint:
            return existing
    _check_free_space(out_dir, sources, tokenizer.dtype.itemsize)

    source_bytes = {name: sum(s.size_bytes for s in files) for name, files in sources.items()}
    try:
        with (
            rust_threads(config.num_workers),
            atomic_output_dir(out_dir, overwrite=True) as staging,
            TokenizeProgress(source_bytes, quiet=quiet) as progress,
        ):
            domains = {
                name: _prepare_domain(
                    name, domain, sources[name], tokenizer, config, staging, progress, max_tokens_per_shard
                )
                for name, domain in config.domains.items()
            }
            write_manifest(_manifest(config, tokenizer, fingerprint, domains, max_tokens_per_shard), staging)
    except OSError as error:
        _refuse_filesystem_error(error, out_dir)
        raise
    return load_manifest(out_dir)


def _manifest(
    config: DataConfig,
    tokenizer: DataTokenizer,
    fingerprint: str,
    domains: dict[str, DomainRecord],
    max_tokens_per_shard: int,
) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        upcycle_version=__version__,
        fingerprint=fingerprint,
        dtype=tokenizer.dtype.name,
        tokenizer=TokenizerRecord(
            path=str(tokenizer.path), sha256=tokenizer.sha256, id_upper_bound=tokenizer.id_upper_bound
        ),
        eos_token=tokenizer.eos_token,
        eos_id=tokenizer.eos_id,
        bos_token=tokenizer.bos_token,
        bos_id=tokenizer.bos_id,
        seed=config.seed,
        heldout=config.heldout,
        max_tokens_per_shard=max_tokens_per_shard,
        domains=domains,
    )


def _refuse_filesystem_error(error: OSError, out_dir: Path) -> None:
    """Turn the two filesystem failures a user can fix into one-sentence refusals."""
    if error.errno == errno.ENOSPC:
        raise UpcycleError(
            f"the disk holding {out_dir} is full; free space or choose another out_dir"
        ) from error
    if error.errno in (errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        raise UpcycleError(
            f"cannot rename folders beside {out_dir} ({error.strerror}); choose an out_dir on a "
            "local filesystem that supports rename"
        ) from error


def _prepare_domain(
    name: str,
    domain: DomainConfig,
    sources: list[SourceFile],
    tokenizer: DataTokenizer,
    config: DataConfig,
    staging: Path,
    progress: TokenizeProgress,
    max_tokens_per_shard: int,
) -> DomainRecord:
    work = ShardWriter(staging, f"_work/{name}", tokenizer.dtype, max_tokens_per_shard=1 << 62)
    doc_lengths, source_records, empty_documents = [], [], 0
    progress.start(name)
    for source in sources:
        kept_before = sum(len(lengths) for lengths in doc_lengths)
        consumed = 0
        for texts, batch_bytes in batched_documents(read_documents(source, domain.text_field, name)):
            tokens, lengths = encode_packed(tokenizer, texts)
            work.write(tokens)
            doc_lengths.append(lengths[lengths > 0])
            empty_documents += int(np.count_nonzero(lengths == 0))
            consumed += batch_bytes
            progress.advance(name, batch_bytes, tokens.size)
        progress.advance(name, max(source.size_bytes - consumed, 0), 0)
        kept = sum(len(lengths) for lengths in doc_lengths) - kept_before
        source_records.append(_source_record(source, kept))
    progress.finish(name)
    work_shards = work.close()

    lengths_tokens = np.concatenate(doc_lengths) if doc_lengths else np.zeros(0, dtype=np.int64)
    if lengths_tokens.size == 0:
        raise UpcycleError(
            f"domain {name!r} has no non-empty documents in its {len(sources)} file(s); check its "
            "`paths` and `text_field`"
        )
    total_tokens = int(lengths_tokens.sum())
    is_heldout = choose_heldout_documents(
        lengths_tokens, config.heldout.target_tokens(total_tokens), config.seed, name
    )
    stream = TokenStream(
        [staging / s.file for s in work_shards], [s.tokens for s in work_shards], tokenizer.dtype
    )
    splits = _write_splits(stream, lengths_tokens, is_heldout, staging, name, tokenizer, max_tokens_per_shard)
    shutil.rmtree(staging / "_work")
    return DomainRecord(
        weight=domain.weight,
        sources=source_records,
        empty_documents_skipped=empty_documents,
        train=splits["train"],
        heldout=splits["heldout"],
    )


def _write_splits(
    stream: TokenStream,
    lengths_tokens: np.ndarray,
    is_heldout: np.ndarray,
    staging: Path,
    name: str,
    tokenizer: DataTokenizer,
    max_tokens_per_shard: int,
) -> dict[str, SplitRecord]:
    """Copy runs of consecutive documents of the same split from the working stream to shards."""
    writers = {
        split: ShardWriter(staging, f"{name}/{split}", tokenizer.dtype, max_tokens_per_shard)
        for split in ("train", "heldout")
    }
    doc_starts = np.concatenate([[0], np.cumsum(lengths_tokens)])
    run_starts = np.concatenate([[0], np.flatnonzero(np.diff(is_heldout.astype(np.int8))) + 1])
    run_ends = np.append(run_starts[1:], len(lengths_tokens))
    for first_doc, end_doc in zip(run_starts, run_ends, strict=True):
        writer = writers["heldout" if is_heldout[first_doc] else "train"]
        for start in range(int(doc_starts[first_doc]), int(doc_starts[end_doc]), _COPY_CHUNK_TOKENS):
            writer.write(stream.read(start, min(start + _COPY_CHUNK_TOKENS, int(doc_starts[end_doc]))))
    records = {}
    for split, writer in writers.items():
        shards = writer.close()
        mask = is_heldout if split == "heldout" else ~is_heldout
        records[split] = SplitRecord(
            tokens=int(lengths_tokens[mask].sum()),
            documents=int(mask.sum()),
            shards=[ShardRecord(file=s.file, tokens=s.tokens) for s in shards],
        )
    return records


def _source_record(source: SourceFile, documents: int) -> SourceRecord:
    return SourceRecord(
        path=str(source.path),
        format=source.format,
        size_bytes=source.size_bytes,
        mtime_ns=source.mtime_ns,
        documents=documents,
    )


def _fingerprint_parts(
    config: DataConfig,
    sources: dict[str, list[SourceFile]],
    tokenizer: DataTokenizer,
    max_tokens_per_shard: int,
) -> dict:
    """Everything that determines the shard bytes; weights and worker counts do not."""
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer.sha256,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "dtype": tokenizer.dtype.name,
        "heldout": config.heldout.model_dump(),
        "seed": config.seed,
        "max_tokens_per_shard": max_tokens_per_shard,
        "domains": {
            name: {
                "text_field": config.domains[name].text_field,
                "sources": [[str(s.path), s.format, s.size_bytes, s.mtime_ns] for s in files],
            }
            for name, files in sources.items()
        },
    }


def _holds_prepared_data(out_dir: Path) -> bool:
    """True for earlier prepared data; refuse a file or a folder with other content."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise UpcycleError(f"out_dir {out_dir} is a file; choose a folder path")
    if (out_dir / MANIFEST_NAME).is_file():
        return True
    if any(out_dir.iterdir()):
        raise UpcycleError(
            f"out_dir {out_dir} holds other files and no {MANIFEST_NAME}; choose an empty or new folder"
        )
    return False


def _check_free_space(out_dir: Path, sources: dict[str, list[SourceFile]], itemsize: int) -> None:
    """Refuse early when even a rough estimate of the output cannot fit on the disk."""
    estimated_tokens = {
        name: sum(s.size_bytes * _TOKENS_PER_SOURCE_BYTE[s.format] for s in files)
        for name, files in sources.items()
    }
    # Final shards of every domain, plus one domain's working copy at a time.
    needed_bytes = int((sum(estimated_tokens.values()) + max(estimated_tokens.values())) * itemsize)
    existing = Path(out_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    free_bytes = shutil.disk_usage(existing).free
    if needed_bytes > free_bytes:
        raise UpcycleError(
            f"preparing this data needs about {needed_bytes / 1e9:.1f} GB but {existing} has "
            f"{free_bytes / 1e9:.1f} GB free; free space or choose another out_dir"
        )
