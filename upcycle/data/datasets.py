"""Training and evaluation batches from prepared data.

Shape letters: B batch (this rank), S sequence length (`seq_len`).

A domain split is cut into non-overlapping windows of S+1 tokens that share their edge token:
window i is tokens [i·S, i·S + S + 1), so inputs are the first S tokens and labels the last S,
and every token except the very first is a label exactly once per pass. The tail that does not
fill a window is unused. Windows cross document boundaries (packing); attention is not masked
at the EOS between documents, as in GPT-2/Llama pretraining.

Batches are read in the calling process: a batch is B memory-mapped slices (a memcpy from the
page cache), so DataLoader workers would add prefetch state that breaks exact resume for no
gain. `PackedSequences` is still a map-style torch Dataset for anyone who wants one.

`domain_ids_B` index `sorted(manifest.domains)`, the same in training and evaluation batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from upcycle.data.manifest import Manifest, Split
from upcycle.data.sampler import MixtureSampler
from upcycle.data.shards import TokenStream
from upcycle.errors import UpcycleError


@dataclass
class Batch:
    """Token ids as int64: labels_BS[b, s] is the token after input_ids_BS[b, s]."""

    input_ids_BS: torch.Tensor
    labels_BS: torch.Tensor
    domain_ids_B: torch.Tensor


class PackedSequences(Dataset):
    """Windows of `seq_len + 1` tokens over one domain split; item i is window i as int64."""

    def __init__(self, stream: TokenStream, seq_len: int):
        if seq_len < 1:
            raise UpcycleError(f"seq_len must be ≥ 1, got {seq_len}; fix the training config")
        self.stream, self.seq_len = stream, seq_len
        self.num_windows = max(stream.num_tokens - 1, 0) // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} outside 0..{self.num_windows - 1}")
        start = index * self.seq_len
        return self.stream.read(start, start + self.seq_len + 1)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.window(index).astype(np.int64))


def _batch_of(windows: list[np.ndarray], domain_ids: np.ndarray) -> Batch:
    tokens_BS1 = torch.from_numpy(np.stack(windows).astype(np.int64))
    return Batch(
        input_ids_BS=tokens_BS1[:, :-1].contiguous(),
        labels_BS=tokens_BS1[:, 1:].contiguous(),
        domain_ids_B=torch.from_numpy(np.asarray(domain_ids, dtype=np.int64)),
    )


def _sequences(manifest: Manifest, domain: str, split: Split, seq_len: int) -> PackedSequences:
    return PackedSequences(manifest.token_stream(domain, split), seq_len)


class TrainBatches:
    """Endless training batches for one rank, mixed over domains; resumable via `state_dict()`.

    `global_batch_size` sequences are drawn per step across all ranks; this rank yields its
    `global_batch_size // world_size` of them. `weights` default to the manifest's; domains left
    out of `weights` get weight 0. `seed` defaults to the manifest's seed.
    """

    def __init__(
        self,
        manifest: Manifest,
        seq_len: int,
        global_batch_size: int,
        *,
        weights: Mapping[str, float] | None = None,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        split: Split = "train",
    ):
        self.domains = sorted(manifest.domains)
        self.seq_len = seq_len
        self._sequences = {d: _sequences(manifest, d, split, seq_len) for d in self.domains}
        self.sampler = MixtureSampler(
            {d: len(sequences) for d, sequences in self._sequences.items()},
            manifest.default_weights() if weights is None else weights,
            global_batch_size,
            seed=manifest.seed if seed is None else seed,
            rank=rank,
            world_size=world_size,
        )

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        domain_index_B, window_index_B = self.sampler.next_picks()
        windows = [
            self._sequences[self.domains[d]].window(int(w))
            for d, w in zip(domain_index_B, window_index_B, strict=True)
        ]
        return _batch_of(windows, domain_index_B)

    def state_dict(self) -> dict:
        return {"seq_len": self.seq_len, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if state["seq_len"] != self.seq_len:
            raise UpcycleError(
                f"the checkpoint's data stream used seq_len={state['seq_len']}, this run has "
                f"{self.seq_len}; resume with the same seq_len"
            )
        self.sampler.load_state_dict(state["sampler"])


class HeldoutBatches:
    """The held-out windows of one domain, in file order, identical on every pass.

    Iterating twice yields the same tokens in the same order, so per-domain perplexities of
    different models are computed on exactly the same text. With `max_sequences`, only the
    first that many windows are used. With several ranks, each takes a contiguous, near-equal
    share of those windows; sum losses and token counts across ranks. The last batch may be
    smaller than `batch_size`: no held-out window is dropped.
    """

    def __init__(
        self,
        manifest: Manifest,
        domain: str,
        seq_len: int,
        batch_size: int,
        *,
        max_sequences: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or (max_sequences is not None and max_sequences < 1) or not 0 <= rank < world_size:
            raise UpcycleError(
                "need batch_size ≥ 1, max_sequences ≥ 1 and 0 ≤ rank < world_size; fix the eval settings"
            )
        self._sequences = _sequences(manifest, domain, "heldout", seq_len)
        total = len(self._sequences) if max_sequences is None else min(max_sequences, len(self._sequences))
        if total < 1:
            tokens = self._sequences.stream.num_tokens
            raise UpcycleError(
                f"domain {domain!r} has {tokens} held-out tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "prepare a larger held-out split or lower seq_len"
            )
        self.window_indices = np.array_split(np.arange(total), world_size)[rank]
        self.batch_size = batch_size
        self.domain_id = sorted(manifest.domains).index(domain)

    @property
    def num_sequences(self) -> int:
        return len(self.window_indices)

    @property
    def num_predicted_tokens(self) -> int:
        """Label positions this rank evaluates: num_sequences × seq_len."""
        return self.num_sequences * self._sequences.seq_len

    def __iter__(self) -> Iterator[Batch]:
        for first in range(0, self.num_sequences, self.batch_size):
            indices = self.window_indices[first : first + self.batch_size]
            windows = [self._sequences.window(int(i)) for i in indices]
            yield _batch_of(windows, np.full(len(indices), self.domain_id))
