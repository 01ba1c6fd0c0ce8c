"""Batched, multi-core tokenisation of documents into one packed token array.

Packing rule: every document becomes `[BOS] tokens EOS` (BOS only with `add_bos`), so the stream
is `doc₁ EOS doc₂ EOS … docₙ EOS`: one EOS between any two documents and one at the end, which
keeps the rule intact when streams are concatenated. Documents that tokenise to nothing (empty
text) are skipped and reported with length 0.

Parallelism comes from the Rust tokenizer (`encode_batch_fast` spreads a batch over a rayon
thread pool, all cores by default). There is deliberately no Python multiprocessing path: it
would copy every document across processes to gain nothing over the Rust threads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import numpy as np

from upcycle.data.tokenizer import DataTokenizer

# A batch must be large enough to keep every core busy and small enough to bound memory:
# a few MB of text is ~1 M tokens, a few ms to a second of work.
MAX_DOCUMENTS_PER_BATCH = 2048
MAX_CHARACTERS_PER_BATCH = 4_000_000


def encode_packed(tokenizer: DataTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise `texts` in parallel; return (packed tokens, packed length of each document).

    A document's packed length counts its BOS and EOS; it is 0 for a skipped empty document.
    """
    encodings = tokenizer.backend.encode_batch_fast(texts, add_special_tokens=False)
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    packed: list[int] = []
    doc_lengths = np.zeros(len(texts), dtype=np.int64)
    for index, encoding in enumerate(encodings):
        ids = encoding.ids
        if not ids:
            continue
        before = len(packed)
        packed += prefix
        packed += ids
        packed.append(tokenizer.eos_id)
        doc_lengths[index] = len(packed) - before
    return np.array(packed, dtype=tokenizer.dtype), doc_lengths


def batched_documents(documents: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    """Group `(text, source_bytes)` pairs into batches: (texts, source bytes they came from)."""
    texts: list[str] = []
    characters = source_bytes = 0
    for text, text_source_bytes in documents:
        texts.append(text)
        characters += len(text)
        source_bytes += text_source_bytes
        if len(texts) >= MAX_DOCUMENTS_PER_BATCH or characters >= MAX_CHARACTERS_PER_BATCH:
            yield texts, source_bytes
            texts, characters, source_bytes = [], 0, 0
    if texts:
        yield texts, source_bytes


@contextlib.contextmanager
def rust_threads(num_workers: int | None) -> Iterator[None]:
    """Run the Rust tokenizer on `num_workers` threads for the duration (None: all cores).

    `TOKENIZERS_PARALLELISM` is read by tokenizers on every call, so it is set here (overriding a
    `false` left in the environment to silence fork warnings) and restored afterwards. A count
    above 1 also sets `RAYON_NUM_THREADS`, which rayon reads once, when its pool starts: it takes
    effect only if nothing in this process has tokenised in parallel yet.
    """
    names = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if num_workers == 1 else "true"
    if num_workers is not None and num_workers > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_workers))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
