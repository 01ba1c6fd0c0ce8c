"""Token-id tf-idf statistics of each domain, and the prefix similarity BTM routes with.

BTM (methods.md §3.3, following Gururangan et al. 2023) routes a context to the expert LMs whose
training data it resembles: the cosine similarity between the context's tf-idf vector and the
mean tf-idf vector of each domain's training data. Here the "terms" are token ids, so no second
tokenizer is involved and the statistics are a few vectors of vocabulary length.

The statistics, from each domain's *training* split (held-out text is never looked at):
- the training stream is cut into chunks of `chunk_len` tokens, at most `chunks_per_domain`
  per domain, spread evenly over the stream (deterministic: no sampling seed);
- idf over all chunks of all domains, smoothed as scikit-learn's default:
  idf(v) = ln((1 + n) / (1 + df(v))) + 1;
- a chunk's vector is count(v)·idf(v), divided by its L2 norm; a domain's centroid is the mean
  of its chunks' vectors.
Chunks, not documents, are the unit because routing compares fixed-size token contexts, and
because a prepared stream keeps no document index beyond the EOS ids.

`prefix_similarity` gives, at every position s, the cosine between the tf-idf vector of the
tokens 0..s of the sequence (the context that predicts token s+1; never a later token) and each
centroid, for all positions at once without a [S, V] tensor:
    dot_s   = Σ_{s'≤s} idf(x_s')·c(x_s') / ‖c‖            (a cumulative sum per domain)
    ‖v_s‖²  = Σ_{s'≤s} (2·r_s' + 1)·idf(x_s')²             (r_s' = earlier occurrences of x_s')
because adding one more occurrence of v to a count c raises (c·idf)² by (2c + 1)·idf².

Shape letters: B batch, S sequence, V vocabulary, N domains (= experts), C chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from upcycle.data import Manifest
from upcycle.errors import UpcycleError

CHUNKS_PER_STEP = 64  # chunks counted at once: a [64, V] count matrix


class DomainTfidf(nn.Module):
    """idf [V] and one centroid per domain [N, V] (buffers, so `.to(device)` moves them)."""

    def __init__(
        self,
        domains: Sequence[str],
        idf_V: torch.Tensor,
        centroids_NV: torch.Tensor,
        chunk_len: int,
        chunks: Sequence[int],
    ) -> None:
        super().__init__()
        if centroids_NV.shape != (len(domains), idf_V.shape[0]):
            raise ValueError(
                f"centroids {tuple(centroids_NV.shape)} do not match {len(domains)} domains × idf"
            )
        self.domains = list(domains)
        self.chunk_len = chunk_len
        self.chunks = list(chunks)
        self.register_buffer("idf_V", idf_V.to(torch.float32))
        self.register_buffer("centroids_NV", centroids_NV.to(torch.float32))

    @property
    def vocab_size(self) -> int:
        return int(self.idf_V.shape[0])

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        domains: Sequence[str] | None = None,
        vocab_size: int | None = None,
        chunk_len: int = 256,
        chunks_per_domain: int = 1024,
    ) -> DomainTfidf:
        """Statistics of `domains` (default: all, sorted) from the manifest's training shards."""
        domains = list(domains) if domains else sorted(manifest.domains)
        V = max(vocab_size or 0, manifest.tokenizer.id_upper_bound)
        if chunk_len < 1 or chunks_per_domain < 1:
            raise UpcycleError("chunk_len and chunks_per_domain must be ≥ 1; fix the BTM settings")
        starts = {d: _chunk_starts(manifest, d, chunk_len, chunks_per_domain) for d in domains}
        df_V = torch.zeros(V, dtype=torch.float64)
        for d in domains:
            for counts_CV in _chunk_counts(manifest, d, starts[d], chunk_len, V):
                df_V += (counts_CV > 0).sum(0)
        total_chunks = sum(len(s) for s in starts.values())
        idf_V = torch.log((1.0 + total_chunks) / (1.0 + df_V)) + 1.0
        centroids = []
        for d in domains:
            summed_V = torch.zeros(V, dtype=torch.float64)
            for counts_CV in _chunk_counts(manifest, d, starts[d], chunk_len, V):
                vectors_CV = counts_CV * idf_V
                summed_V += (vectors_CV / vectors_CV.norm(dim=-1, keepdim=True)).sum(0)
            centroids.append(summed_V / len(starts[d]))
        return cls(domains, idf_V, torch.stack(centroids), chunk_len, [len(starts[d]) for d in domains])

    def prefix_similarity(
        self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cosine similarity [B, S, N] of each prefix 0..s to each domain (0 for an empty prefix).

        Padding (`attention_mask_BS` 0) does not count as context.
        """
        if int(input_ids_BS.max()) >= self.vocab_size:
            raise UpcycleError(
                f"token id {int(input_ids_BS.max())} is outside the BTM tf-idf vocabulary of "
                f"{self.vocab_size}; rebuild the ensemble with the experts' vocabulary"
            )
        idf_V = self.idf_V.to(torch.float64)
        centroids_NV = self.centroids_NV.to(torch.float64)
        unit_centroids_VN = (centroids_NV / centroids_NV.norm(dim=-1, keepdim=True).clamp_min(1e-30)).T
        real_BS = (
            torch.ones_like(input_ids_BS, dtype=torch.float64)
            if attention_mask_BS is None
            else attention_mask_BS.to(torch.float64)
        )
        idf_BS = idf_V[input_ids_BS]
        dot_BSN = (unit_centroids_VN[input_ids_BS] * (idf_BS * real_BS)[..., None]).cumsum(1)
        earlier_BS = earlier_occurrences(input_ids_BS, real_BS > 0, self.vocab_size).to(torch.float64)
        norm2_BS = ((2.0 * earlier_BS + 1.0) * idf_BS.square() * real_BS).cumsum(1)
        similarity_BSN = dot_BSN / norm2_BS.sqrt().clamp_min(1e-30)[..., None]
        return similarity_BSN.to(torch.float32)


def earlier_occurrences(input_ids_BS: torch.Tensor, real_BS: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """r[b, s] = how often token input_ids[b, s] occurs at real positions s' < s of row b.

    One stable sort of (row, token) keys: inside a run of equal keys, positions are in order, so
    the rank within the run counts the earlier occurrences. Padding gets its own key per row.
    """
    B, S = input_ids_BS.shape
    rows_BS = torch.arange(B, device=input_ids_BS.device)[:, None] * (vocab_size + 1)
    keys_T = (torch.where(real_BS, input_ids_BS, vocab_size) + rows_BS).flatten()
    order_T = torch.argsort(keys_T, stable=True)
    sorted_T = keys_T[order_T]
    rank_T = torch.arange(keys_T.numel(), device=keys_T.device) - torch.searchsorted(sorted_T, sorted_T)
    return torch.empty_like(rank_T).scatter_(0, order_T, rank_T).view(B, S)


def _chunk_starts(manifest: Manifest, domain: str, chunk_len: int, chunks_per_domain: int) -> np.ndarray:
    tokens = manifest.token_stream(domain, "train").num_tokens
    available = tokens // chunk_len
    if available < 1:
        raise UpcycleError(
            f"domain {domain!r} has {tokens} training tokens, fewer than one chunk of {chunk_len}; "
            "lower the tf-idf chunk length"
        )
    picks = np.unique(
        np.linspace(0, available - 1, num=min(available, chunks_per_domain)).round().astype(np.int64)
    )
    return picks * chunk_len


def _chunk_counts(manifest: Manifest, domain: str, starts: np.ndarray, chunk_len: int, vocab_size: int):
    """Token counts [C, V] (float64) of the chunks at `starts`, CHUNKS_PER_STEP at a time."""
    stream = manifest.token_stream(domain, "train")
    for first in range(0, len(starts), CHUNKS_PER_STEP):
        chunks = [stream.read(int(s), int(s) + chunk_len) for s in starts[first : first + CHUNKS_PER_STEP]]
        ids_CL = torch.from_numpy(np.stack(chunks).astype(np.int64))
        counts_CV = torch.zeros(ids_CL.shape[0], vocab_size, dtype=torch.float64)
        yield counts_CV.scatter_add_(1, ids_CL, torch.ones_like(ids_CL, dtype=torch.float64))
