"""Shared pieces of the test_train_*.py modules (this module holds no tests).

- `prepared_data` (import `prepared_data_fixture`): a session fixture with two generated domains tokenised by a byte-level BPE
  trained here (vocabulary 320), prepared once for every training test;
- `train_config(...)`: a tiny, fast config dict over that data;
- `DENSE`, `MOE`: tiny model configs;
- `LOSS_FAULTS`: ways to make a step's loss (or only its gradient) non-finite, by name;
- `one_thread`: the tests run torch on one thread, which on a small shared machine is both
  faster for these tiny models and the same in every process (bitwise comparisons between a
  subprocess and this process need the same thread count).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from upcycle.data import DataConfig, prepare_data
from upcycle.data.synthetic import synthetic_documents, train_byte_level_bpe
from upcycle.train.metrics import read_records

VOCAB = 320
SEQ_LEN = 32
DENSE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
MOE = dict(DENSE, moe=dict(num_experts=4, top_k=2, implementation="eager"))


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradient norm is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


LOSS_FAULTS = {
    "nan": lambda total: total * float("nan"),
    "inf": lambda total: total + float("inf"),
    "nan_gradient": NanGradient.apply,
}
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session", name="prepared_data")
def prepared_data_fixture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    tokenizer = train_byte_level_bpe(synthetic_documents(200, seed=1), VOCAB, root / "tokenizer")
    domains = {}
    for name, seed in (("code", 2), ("math", 3)):
        path = root / f"{name}.jsonl"
        documents = synthetic_documents(150, seed=seed, mean_words=60)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        domains[name] = {"paths": [str(path)]}
    config = DataConfig(domains=domains, tokenizer=tokenizer, heldout={"fraction": 0.1})
    prepare_data(config, root / "data", quiet=True)
    return root / "data"


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train_config(data_dir: Path, output: Path, model_config: dict | None = None, **overrides) -> dict:
    """A tiny run of a fresh model (default: the tiny MoE): global batch 8 in two micro-batches
    of 4, 32-token sequences, 10 steps, no eval. Override any section by its key."""
    config = {
        "model": {"config": MOE if model_config is None else model_config},
        "data": {"path": str(data_dir), "seq_len": SEQ_LEN},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 5},
        "stop": {"max_steps": 10},
        "eval": {"every_steps": 0, "at_end": False},
        "log": {"progress": False},
        "output": str(output),
    }
    for key, value in overrides.items():  # sections merge key by key; model, stop, scalars are replaced
        config[key] = (
            {**config[key], **value} if key in config and key not in ("model", "stop", "output") else value
        )
    return config


def train_records(output: Path) -> list[dict]:
    return [r for r in read_records(Path(output) / "metrics.jsonl") if r["kind"] == "train"]


def distributed_environment(rank: int, world_size: int, port: int) -> None:
    """What torchrun would set for one rank of a one-machine gloo job (one CPU thread each)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _run_then_exit(rank: int, worker, *args) -> None:
    """Run the worker; on success leave at once with os._exit(0), skipping the interpreter's
    teardown (atexit hooks and C++ static destructors of gloo and the libraries torch loaded).
    Once in about 25 runs a CI worker died with SIGABRT ("terminate called without an active
    exception") and no Python traceback; if that comes from teardown, this avoids it. A worker
    that raises still reaches torch's error reporting and fails the test."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, world_size: int, args: tuple, timeout: float = 180) -> None:
    """Run `worker(rank, world_size, port, *args)` on `world_size` processes; fail (and kill
    them) after `timeout` seconds."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(
        _run_then_exit,
        args=(worker, world_size, port, *args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} processes did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
