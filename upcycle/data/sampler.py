"""`MixtureSampler`: a deterministic, resumable stream of (domain, window) picks for training.

The stream is defined per *global sample index* g = 0, 1, 2, ..., independent of batch size and
of the number of ranks:
- the domain of sample g is a weighted draw from a generator keyed by (seed, g // BLOCK), so any
  sample's domain is computable without replaying earlier ones;
- the k-th sample drawn from domain d takes window `perm(d, k // n_d)[k % n_d]`, where
  `perm(d, epoch)` is a seeded permutation of d's n_d windows. Every window of a domain is used
  exactly once per epoch of that domain; domains run through their epochs at their own pace.
A global batch is the next `global_batch_size` samples; rank r takes the r-th contiguous slice.
All ranks compute the same global picks (index arithmetic only), so together they consume each
sample exactly once.

State is two kinds of integers: samples consumed so far and per-domain counts. Because the
stream does not depend on batch size or world size, a run may resume with a different number
of ranks or batch size and continue the same sample sequence.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from upcycle.data.split import seeded_rng
from upcycle.errors import UpcycleError

_SAMPLES_PER_DOMAIN_BLOCK = 4096
_STATE_VERSION = 1


class MixtureSampler:
    """Picks for one rank: `next_picks()` → (domain_index_B, window_index_B) of its batch slice."""

    def __init__(
        self,
        windows_per_domain: Mapping[str, int],
        weights: Mapping[str, float],
        global_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_layout(global_batch_size, rank, world_size)
        self.domains = sorted(windows_per_domain)  # canonical order: config order does not matter
        self.windows_per_domain = {d: int(windows_per_domain[d]) for d in self.domains}
        self.weights = {d: float(weights.get(d, 0.0)) for d in self.domains}
        _check_weights(self.windows_per_domain, self.weights, weights)
        probabilities = np.array([self.weights[d] for d in self.domains]) / sum(self.weights.values())
        self._cumulative = np.cumsum(probabilities)
        self._cumulative[-1] = 1.0  # uniform draws are < 1, so the last domain catches rounding
        self.global_batch_size, self.seed = global_batch_size, int(seed)
        self.rank, self.world_size = rank, world_size
        self.samples_seen = 0
        self.domain_samples = dict.fromkeys(self.domains, 0)
        self._domain_block: tuple[int, np.ndarray] | None = None
        self._permutations: dict[tuple[str, int], np.ndarray] = {}

    def next_picks(self) -> tuple[np.ndarray, np.ndarray]:
        """Advance by one global batch; return this rank's (domain index, window index) arrays."""
        domain_index_G = self._domains_of(self.samples_seen, self.global_batch_size)
        window_index_G = np.empty(self.global_batch_size, dtype=np.int64)
        for index, domain in enumerate(self.domains):
            rows = np.flatnonzero(domain_index_G == index)
            if rows.size:
                window_index_G[rows] = self._windows(domain, self.domain_samples[domain], rows.size)
                self.domain_samples[domain] += rows.size
        self.samples_seen += self.global_batch_size
        local = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        return domain_index_G[local], window_index_G[local]

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def epochs_completed(self) -> dict[str, int]:
        """Finished passes over each domain's windows (across all ranks)."""
        return {d: self.domain_samples[d] // n for d, n in self.windows_per_domain.items() if n}

    def state_dict(self) -> dict:
        """Small, JSON-safe state: counters plus what they are only meaningful with."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "samples_seen": self.samples_seen,
            "domain_samples": dict(self.domain_samples),
            "windows_per_domain": dict(self.windows_per_domain),
            "weights": dict(self.weights),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue a stream; refuse state made with another seed, weights or data layout."""
        if state.get("version") != _STATE_VERSION:
            raise UpcycleError(
                f"data sampler state version {state.get('version')} is not {_STATE_VERSION}; "
                "resume with the upcycle version that wrote the checkpoint"
            )
        for key in ("seed", "windows_per_domain", "weights"):
            if state[key] != getattr(self, key):
                raise UpcycleError(
                    f"the checkpoint's data stream was made with {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; resume with the same data, seq_len, weights and seed"
                )
        self.samples_seen = int(state["samples_seen"])
        self.domain_samples = {d: int(state["domain_samples"][d]) for d in self.domains}
        self._permutations.clear()

    def _domains_of(self, first_sample: int, count: int) -> np.ndarray:
        """Domain index of samples [first_sample, first_sample + count)."""
        if len(self.domains) == 1:
            return np.zeros(count, dtype=np.int64)
        pieces, sample, end = [], first_sample, first_sample + count
        while sample < end:
            block, offset = divmod(sample, _SAMPLES_PER_DOMAIN_BLOCK)
            take = min(_SAMPLES_PER_DOMAIN_BLOCK - offset, end - sample)
            pieces.append(self._block_draws(block)[offset : offset + take])
            sample += take
        return np.concatenate(pieces)

    def _block_draws(self, block: int) -> np.ndarray:
        if self._domain_block is None or self._domain_block[0] != block:
            uniform = seeded_rng("mixture-domains", self.seed, block).random(_SAMPLES_PER_DOMAIN_BLOCK)
            self._domain_block = (block, np.searchsorted(self._cumulative, uniform, side="right"))
        return self._domain_block[1]

    def _windows(self, domain: str, first: int, count: int) -> np.ndarray:
        """Windows for the domain's samples number [first, first + count), across epochs."""
        num_windows = self.windows_per_domain[domain]
        positions = np.arange(first, first + count, dtype=np.int64)
        epochs, offsets = np.divmod(positions, num_windows)
        windows = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            windows[rows] = self._permutation(domain, int(epoch))[offsets[rows]]
        return windows

    def _permutation(self, domain: str, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._permutations:
            # Keep only this domain's newest epochs; older ones are never needed again.
            for old in [k for k in self._permutations if k[0] == domain and k[1] < epoch - 1]:
                del self._permutations[old]
            rng = seeded_rng("window-order", self.seed, domain, epoch)
            self._permutations[key] = rng.permutation(self.windows_per_domain[domain])
        return self._permutations[key]


def _check_layout(global_batch_size: int, rank: int, world_size: int) -> None:
    if global_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise UpcycleError(
            f"need global_batch_size ≥ 1 and 0 ≤ rank < world_size, got {global_batch_size}, "
            f"{rank}, {world_size}; fix the batch or launch settings"
        )
    if global_batch_size % world_size:
        raise UpcycleError(
            f"global batch size {global_batch_size} does not split evenly over {world_size} ranks; "
            "use a multiple of the world size"
        )


def _check_weights(windows: dict[str, int], weights: dict[str, float], given: Mapping[str, float]) -> None:
    unknown = sorted(set(given) - set(windows))
    if unknown:
        raise UpcycleError(f"weights name unknown domains {unknown}; use names from {sorted(windows)}")
    if any(w < 0 or not np.isfinite(w) for w in weights.values()) or sum(weights.values()) <= 0:
        raise UpcycleError(f"mixture weights {weights} must be finite, ≥ 0 and not all 0; fix them")
    for domain, weight in weights.items():
        if weight > 0 and windows[domain] < 1:
            raise UpcycleError(
                f"domain {domain!r} has weight {weight} but no full training sequence; give it "
                "weight 0, add data or lower seq_len"
            )
