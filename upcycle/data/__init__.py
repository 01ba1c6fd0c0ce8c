"""Data room: text/JSONL/Parquet → token shards + manifest, mixtures, resumable sampling, eval.

Public API (everything else is an implementation detail):

- `DataConfig`, `DomainConfig`, `HeldoutConfig`: what to prepare (config.py);
- `prepare_data(config, out_dir) -> Manifest`: tokenise into shards, atomically (prepare.py);
- `load_manifest(dir) -> Manifest`, `check_tokenizer_matches(manifest, tokenizer_dir)`;
- `TrainBatches`: mixed, rank-sharded, resumable training batches (datasets.py);
- `HeldoutBatches`: one domain's held-out windows, identical on every pass (datasets.py);
- `PackedSequences`, `MixtureSampler`, `Batch`: the pieces those two are made of.
"""

from upcycle.data.config import DataConfig, DomainConfig, HeldoutConfig
from upcycle.data.datasets import Batch, HeldoutBatches, PackedSequences, TrainBatches
from upcycle.data.manifest import Manifest, load_manifest
from upcycle.data.prepare import prepare_data
from upcycle.data.sampler import MixtureSampler
from upcycle.data.tokenizer import check_tokenizer_matches, tokenizer_sha256

__all__ = [
    "Batch",
    "DataConfig",
    "DomainConfig",
    "HeldoutBatches",
    "HeldoutConfig",
    "Manifest",
    "MixtureSampler",
    "PackedSequences",
    "TrainBatches",
    "check_tokenizer_matches",
    "load_manifest",
    "prepare_data",
    "tokenizer_sha256",
]
