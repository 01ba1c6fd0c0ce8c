"""Seeded randomness keyed by names, and the held-out choice of whole documents.

Every random stream in the data room comes from `seeded_rng(purpose, seed, *names_or_ints)`:
a NumPy generator whose seed mixes a purpose tag, the user's seed and e.g. a domain name. Keying
by domain *name* (hashed) rather than by position means adding, removing or reordering domains
leaves every other domain's split and sample order unchanged.
"""

from __future__ import annotations

import hashlib

import numpy as np

from upcycle.errors import UpcycleError


def seeded_rng(purpose: str, seed: int, *keys: str | int) -> np.random.Generator:
    """A generator determined only by `purpose`, `seed` and `keys` (strings hashed to 64 bits)."""
    words = [
        _as_int(purpose),
        int(seed),
        *(_as_int(key) if isinstance(key, str) else int(key) for key in keys),
    ]
    return np.random.default_rng(words)


def _as_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def choose_heldout_documents(
    doc_lengths_tokens: np.ndarray, target_tokens: int, seed: int, domain: str
) -> np.ndarray:
    """Boolean mask of held-out documents: a seeded shuffle's shortest prefix reaching the target.

    The held-out split therefore holds whole documents, at least `target_tokens` tokens and less
    than that plus one document. Refuses when it would leave no training document.
    """
    num_docs = len(doc_lengths_tokens)
    is_heldout = np.zeros(num_docs, dtype=bool)
    if target_tokens <= 0:
        return is_heldout
    order = seeded_rng("heldout", seed, domain).permutation(num_docs)
    cumulative_tokens = np.cumsum(doc_lengths_tokens[order])
    num_heldout = int(np.searchsorted(cumulative_tokens, target_tokens, side="left")) + 1
    if num_heldout >= num_docs:
        raise UpcycleError(
            f"a held-out split of {target_tokens} tokens would take all {num_docs} documents "
            f"({int(cumulative_tokens[-1])} tokens) of domain {domain!r}; lower `heldout` or add documents"
        )
    is_heldout[order[:num_heldout]] = True
    return is_heldout
