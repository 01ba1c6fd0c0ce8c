"""Find a domain's source files and read their documents, in a fixed order.

Order matters: it fixes the token stream, the held-out choice and the fingerprint. Files come in
the order of `paths`; a folder or glob contributes its files sorted by path. A file reached twice
is refused rather than silently read twice or once.

Document rules (also in `DomainConfig`'s docstring):
- text: one file is one document, its exact UTF-8 content (line endings kept);
- jsonl: one JSON object per line, the document in `text_field`; blank lines are skipped;
- parquet: one row per document, from the string column `text_field`.
A null value or an empty string is an empty document; the tokenising step skips and counts it.
Anything else malformed (bad UTF-8, bad JSON, a missing field) is refused with file and line,
because silently dropping or repairing text would change the data without anyone noticing.

Readers yield `(text, source_bytes)` pairs; `source_bytes` only drives the progress bar.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from upcycle.data.config import DomainConfig
from upcycle.errors import UpcycleError

EXTENSIONS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".ndjson"),
    "parquet": (".parquet", ".pq"),
}
# With an explicit `format: jsonl`, folders also contribute `.json` files (a common JSONL name);
# `auto` does not guess, since a `.json` file is as often one big JSON document.
_EXTRA_EXTENSIONS_WHEN_EXPLICIT = {"jsonl": (".json",)}
_PARQUET_ROWS_PER_BATCH = 8192


@dataclass(frozen=True)
class SourceFile:
    """One input file with the stat values recorded in the manifest and the fingerprint."""

    path: Path
    format: str
    size_bytes: int
    mtime_ns: int


def resolve_sources(domain_name: str, domain: DomainConfig) -> list[SourceFile]:
    """Expand a domain's `paths` into files with formats; refuse missing or unreadable inputs."""
    sources: list[SourceFile] = []
    seen: set[Path] = set()
    for pattern in domain.paths:
        for path, listed_explicitly in _expand_path(domain_name, domain, pattern):
            if path in seen:
                raise UpcycleError(
                    f"{path} is reached twice by the paths of domain {domain_name!r}; list it once"
                )
            seen.add(path)
            file_format = _format_of(domain_name, domain, path, listed_explicitly)
            stat = path.stat()
            sources.append(SourceFile(path, file_format, stat.st_size, stat.st_mtime_ns))
    return sources


def read_documents(source: SourceFile, text_field: str, domain_name: str) -> Iterator[tuple[str, int]]:
    """Yield `(document_text, source_bytes_consumed)` for every document of one file, in order."""
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}
    yield from readers[source.format](source, text_field, domain_name)


def _expand_path(domain_name: str, domain: DomainConfig, pattern: str) -> Iterator[tuple[Path, bool]]:
    if glob.has_magic(pattern):
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UpcycleError(
                f"the pattern {pattern!r} of domain {domain_name!r} matches no file; fix the path"
            )
    else:
        matches = [os.path.expanduser(pattern)]
    for match in matches:
        path = Path(match).resolve()
        if path.is_dir():
            yield from ((file, False) for file in _files_in_folder(domain_name, domain, path))
        elif path.is_file():
            yield path, True
        else:
            raise UpcycleError(f"data path {match!r} of domain {domain_name!r} does not exist; fix the path")


def _files_in_folder(domain_name: str, domain: DomainConfig, folder: Path) -> list[Path]:
    if domain.format == "auto":
        wanted = tuple(ext for exts in EXTENSIONS_BY_FORMAT.values() for ext in exts)
    else:
        wanted = EXTENSIONS_BY_FORMAT[domain.format] + _EXTRA_EXTENSIONS_WHEN_EXPLICIT.get(domain.format, ())
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root, n) for n in names if not n.startswith(".") and n.lower().endswith(wanted)]
    if not files:
        raise UpcycleError(
            f"folder {folder} of domain {domain_name!r} holds no {'/'.join(wanted)} files; "
            "fix the path or set the domain's `format`"
        )
    return sorted(files)


def _format_of(domain_name: str, domain: DomainConfig, path: Path, listed_explicitly: bool) -> str:
    if domain.format != "auto":
        return domain.format
    for file_format, extensions in EXTENSIONS_BY_FORMAT.items():
        if path.name.lower().endswith(extensions):
            return file_format
    assert listed_explicitly, "folders only yield files with known extensions"
    raise UpcycleError(
        f"cannot tell the format of {path} from its extension; set `format` (text, jsonl or "
        f"parquet) for domain {domain_name!r}"
    )


def _read_text(source: SourceFile, text_field: str, domain_name: str) -> Iterator[tuple[str, int]]:
    data = source.path.read_bytes()
    yield _decode_utf8(data, f"{source.path}"), len(data)


def _read_jsonl(source: SourceFile, text_field: str, domain_name: str) -> Iterator[tuple[str, int]]:
    pending_bytes = 0  # blank lines' bytes, credited to the next document for progress
    with open(source.path, "rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            pending_bytes += len(line)
            if not line.strip():
                continue
            where = f"{source.path}:{line_number}"
            record = _parse_json_line(line, where)
            if text_field not in record:
                keys = ", ".join(sorted(record)[:10])
                raise UpcycleError(
                    f"{where} has no field {text_field!r} (it has: {keys}); set `text_field` "
                    f"of domain {domain_name!r}"
                )
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise UpcycleError(
                    f"{where}: field {text_field!r} holds a {type(text).__name__}, not a string; "
                    f"fix the data or set `text_field` of domain {domain_name!r}"
                )
            yield text or "", pending_bytes
            pending_bytes = 0


def _parse_json_line(line: bytes, where: str) -> dict:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as error:
        raise UpcycleError(f"{where} is not valid UTF-8 ({error.reason}); re-encode the file") from None
    except json.JSONDecodeError as error:
        raise UpcycleError(f"{where} is not valid JSON ({error.msg}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise UpcycleError(f"{where} is not a JSON object; write one object per line")
    return record


def _read_parquet(source: SourceFile, text_field: str, domain_name: str) -> Iterator[tuple[str, int]]:
    pyarrow, parquet = _import_pyarrow()
    unreadable = UpcycleError(
        f"{source.path} is not a readable Parquet file; check the file, or set `format` of domain "
        f"{domain_name!r} if it is not Parquet"
    )
    try:
        table_file = parquet.ParquetFile(source.path)
    except (pyarrow.ArrowException, OSError) as error:
        raise unreadable from error
    schema = table_file.schema_arrow
    if text_field not in schema.names:
        raise UpcycleError(
            f"{source.path} has no column {text_field!r} (it has: {', '.join(schema.names[:10])}); "
            f"set `text_field` of domain {domain_name!r}"
        )
    column_type = schema.field(text_field).type
    string_types = (pyarrow.types.is_string, pyarrow.types.is_large_string, _is_string_view(pyarrow))
    if not any(is_type(column_type) for is_type in string_types):
        raise UpcycleError(
            f"{source.path}: column {text_field!r} is {column_type}, not a string column; "
            f"set `text_field` of domain {domain_name!r}"
        )
    bytes_per_row = source.size_bytes / max(table_file.metadata.num_rows, 1)
    batches = table_file.iter_batches(batch_size=_PARQUET_ROWS_PER_BATCH, columns=[text_field])
    while True:
        try:
            batch = next(batches, None)
        except (pyarrow.ArrowException, OSError) as error:  # a damaged row group
            raise unreadable from error
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            yield text or "", int(bytes_per_row)


def _is_string_view(pyarrow):
    return getattr(pyarrow.types, "is_string_view", lambda column_type: False)  # pyarrow ≥ 16


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UpcycleError("reading Parquet needs pyarrow; run `pip install pyarrow`") from None
    return pyarrow, pyarrow.parquet


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UpcycleError(
            f"{where} is not valid UTF-8 (byte {error.start}: {error.reason}); re-encode the file"
        ) from None
