"""The document type every source yields, and the one rule that turns a stream into a sized domain.

Size is counted in UTF-8 bytes of document text (not of the JSONL that holds it). Documents are
never cut and never repeated: a domain holds whole documents up to the requested size, and when a
source runs out first the domain is smaller and says so (`exhausted`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Document", "Selection", "chunk_paragraphs", "take_documents"]

# Stop looking for a document that still fits once this little room is left, or after this many
# documents in a row did not fit: the tail of a large source is not worth reading for a few bytes.
_ENOUGH_ROOM_BYTES = 256
_MAX_MISSES_IN_A_ROW = 200


class Document(NamedTuple):
    text: str
    source: str  # where it came from: a file path, an article title, a generator name


@dataclass
class Selection:
    documents: list[Document]
    text_bytes: int
    exhausted: bool  # the source ran out before the requested size was reached
    seen_bytes: int  # bytes of every document looked at; the whole source when exhausted


def take_documents(stream: Iterable[Document], max_bytes: int) -> Selection:
    """Whole documents from `stream`, in order, skipping any that would pass `max_bytes`."""
    taken: list[Document] = []
    total = seen = misses = 0
    exhausted = True
    for document in stream:
        size = len(document.text.encode("utf-8"))
        seen += size
        if total + size <= max_bytes:
            taken.append(document)
            total, misses = total + size, 0
        else:
            misses += 1
        if max_bytes - total < _ENOUGH_ROOM_BYTES or misses >= _MAX_MISSES_IN_A_ROW:
            exhausted = False
            break
    return Selection(taken, total, exhausted, seen)


def chunk_paragraphs(text: str, max_chars: int) -> list[str]:
    """Split `text` at blank lines into pieces of at most about `max_chars` characters.

    A single paragraph longer than `max_chars` stays whole: cutting inside a paragraph would
    make text that no writer wrote.
    """
    pieces, current, length = [], [], 0
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        if current and length + len(paragraph) > max_chars:
            pieces.append("\n\n".join(current))
            current, length = [], 0
        current.append(paragraph)
        length += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces
