"""FSDP2 data parallelism on CPU (gloo, 2 processes) against one process on the same global batch.

One process runs global batch 4 as two micro-batches of 2; two processes run one micro-batch of
2 each. The micro-batches hold the same sequences, so the aux losses (computed per forward call)
are the same, and per-step losses must agree within 1e-6 for 5 steps, for a dense and an MoE
model. The MoE run also checkpoints at step 3; a copy of it without the step-5 checkpoint is
resumed on 2 ranks, which tests the gather-to-rank-0 save and broadcast-from-rank-0 load.

The two ranks are started by one spawn helper with torchrun's environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so they take the same path as under torchrun,
except that the process group is made once for the three runs (a fresh group per run on one
port can hang in the rendezvous, and `upcycle train` makes one per process anyway).
"""

from __future__ import annotations

import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_train_helpers import (  # noqa: F401
    DENSE,
    MOE,
    distributed_environment,
    one_thread,
    prepared_data_fixture,
    train_config,
    train_records,
)
from test_train_helpers import spawn as spawn_processes

from upcycle.train import train

WORLD_SIZE = 2
STEPS = 5


def _config(data, output, model) -> dict:
    return train_config(
        data,
        output,
        model_config=model,
        batch={"global_batch_size": 4, "micro_batch_size": 2},
        stop={"max_steps": STEPS},
        checkpoint={"every_steps": 3},
        deterministic=True,
    )


def _worker(rank: int, world_size: int, port: int, jobs: list[tuple[dict, bool, tuple | None]]) -> None:
    distributed_environment(rank, world_size, port)
    # One process group for all jobs: the trainer uses a group it finds and leaves it open.
    dist.init_process_group("gloo")
    try:
        for config, resume, prepare_copy in jobs:
            if prepare_copy is not None and rank == 0:
                source, target = prepare_copy
                shutil.copytree(source, target)
                shutil.rmtree(f"{target}/checkpoints/step-00000005")
                shutil.rmtree(f"{target}/final")
            dist.barrier()
            train(config, resume=resume, quiet=True)
    finally:
        dist.destroy_process_group()


def spawn(jobs: list, timeout: float = 240) -> None:
    """Run `jobs` on WORLD_SIZE processes; fail (and kill them) after `timeout` seconds."""
    spawn_processes(_worker, WORLD_SIZE, (jobs,), timeout)


def _losses(output) -> list[float]:
    return [r["loss"] for r in train_records(output)]


def test_fsdp2_on_two_processes_matches_one_process(prepared_data, tmp_path):
    models = {"dense": DENSE, "moe": MOE}
    jobs = [
        (_config(prepared_data, tmp_path / f"{name}-2", model), False, None) for name, model in models.items()
    ]
    resumed = tmp_path / "moe-2-resumed"
    jobs.append((_config(prepared_data, resumed, MOE), True, (str(tmp_path / "moe-2"), str(resumed))))
    spawn(jobs)

    for name, model in models.items():
        train(_config(prepared_data, tmp_path / f"{name}-1", model), quiet=True)
        one, two = _losses(tmp_path / f"{name}-1"), _losses(tmp_path / f"{name}-2")
        assert len(one) == len(two) == STEPS
        assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-6, (name, one, two)
        single = load_file(tmp_path / f"{name}-1" / "final" / "model.safetensors")
        sharded = load_file(tmp_path / f"{name}-2" / "final" / "model.safetensors")
        assert single.keys() == sharded.keys()
        assert all(torch.allclose(single[k], sharded[k], atol=1e-5) for k in single)
    moe_records = train_records(tmp_path / "moe-2")
    assert all(sum(r["aux_losses"].values()) > 0 for r in moe_records)
    assert _losses(resumed) == _losses(tmp_path / "moe-2")  # resumed on 2 ranks from step 3: exact


def test_bf16_weights_with_fp32_routers_shard_on_two_processes(prepared_data, tmp_path):
    """`precision: bf16-weights` under FSDP2: the fp32 routers get FSDP units of their own (one
    parameter dtype per unit, or FSDP2 refuses the block), and two processes train as one does,
    within bf16 rounding (the gradients are reduced in bf16 on two ranks, accumulated in bf16
    over two micro-batches on one)."""
    config = {**_config(prepared_data, tmp_path / "two", MOE), "precision": "bf16-weights"}
    spawn([(config, False, None)])
    train({**config, "output": str(tmp_path / "one")}, quiet=True)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) / a for a, b in zip(one, two, strict=True)) < 1e-2, (one, two)
    assert one[-1] < one[0]
    saved = load_file(tmp_path / "two" / "checkpoints" / "step-00000003" / "model" / "model.safetensors")
    dtypes = {name: t.dtype for name, t in saved.items()}  # the training state, as it was sharded
    assert {d for n, d in dtypes.items() if n.endswith("mlp.gate.weight")} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith("mlp.gate.weight")} == {torch.bfloat16}
