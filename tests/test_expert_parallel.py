"""Expert parallelism (+ FSDP2) on CPU (gloo, spawned processes) against one process.

- The dispatch/combine of one MoE layer (all-to-all out, local experts, all-to-all back) against
  the local layer, forward and backward, on 2 ranks with different token counts: eager and
  grouped experts, gated and not, a capacity drop, and a rank that receives no token at all.
- Training: the tiny MoE for 5 steps at global batch 4 in micro-batches of 1, on 1 process,
  2 processes (ep=2), and 4 processes (ep=2 × dp=2, and ep=4 with activation checkpointing),
  every one with a held-out evaluation at the end; the losses must agree within 1e-6.
- Checkpoints: the 4-process ep=2 run checkpoints at step 3; copies of it without the step-5
  checkpoint resume on 2 processes with FSDP2 alone (ep=1) and on 1 process, and must continue
  with the same losses (within 1e-6). The saved experts are full [E, ...] stacks.
- Refusals: an expert_parallel that does not divide the world size or the experts, or a dense
  model.

Processes are started as in test_train_distributed.py (torchrun's environment variables, one
process group per spawn for all its jobs). The training runs happen once, in a module fixture.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_train_helpers import (  # noqa: F401
    MOE,
    distributed_environment,
    one_thread,
    prepared_data_fixture,
    spawn,
    train_config,
)

from upcycle.errors import UpcycleError
from upcycle.train import TrainConfig, train
from upcycle.train.metrics import read_records
from upcycle.train.preflight import plan_run

STEPS = 5
TOLERANCE = 1e-6


# --- spawning -----------------------------------------------------------------------------------


def _train_worker(rank: int, world_size: int, port: int, jobs: list[tuple[dict, bool, tuple | None]]) -> None:
    distributed_environment(rank, world_size, port)
    dist.init_process_group("gloo")
    try:
        for config, resume, prepare_copy in jobs:
            if prepare_copy is not None and rank == 0:
                _copy_without_last(*prepare_copy)
            dist.barrier()
            train(config, resume=resume, quiet=True)
    finally:
        dist.destroy_process_group()


def _copy_without_last(source: str, target: str) -> None:
    """A run folder as it was after its step-3 checkpoint."""
    shutil.copytree(source, target)
    shutil.rmtree(f"{target}/checkpoints/step-00000005")
    shutil.rmtree(f"{target}/final")


# --- dispatch / combine against the local layer ----------------------------------------------


def _dispatch_worker(rank: int, world_size: int, port: int) -> None:
    distributed_environment(rank, world_size, port)
    dist.init_process_group("gloo")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
        cases = [
            ("eager", True, None, False),
            ("grouped", True, None, False),
            ("eager", False, 1.0, False),  # not gated; capacity drops some assignments
            ("grouped", True, None, True),  # every token to rank 0's experts: rank 1 gets none
        ]
        for implementation, gated, capacity_factor, skewed in cases:
            _check_dispatch(rank, world_size, mesh, implementation, gated, capacity_factor, skewed)
    finally:
        dist.destroy_process_group()


def _check_dispatch(rank, world_size, mesh, implementation, gated, capacity_factor, skewed) -> None:
    from upcycle.model.config import ModelConfig
    from upcycle.model.moe import MoE
    from upcycle.train.expert_parallel import distribute_experts

    moe = dict(num_experts=4, top_k=2, implementation=implementation, gated=gated)
    moe.update(capacity_factor=capacity_factor, z_loss_coef=1e-3)
    config = ModelConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        moe=moe,
    )
    torch.manual_seed(0)
    local = MoE(config)
    if skewed:  # x > 0 and only experts 0 and 1 see it: all tokens go to them
        with torch.no_grad():
            local.gate.weight.zero_()
            local.gate.weight[0].fill_(1.0)
            local.gate.weight[1].fill_(0.5)
    sharded = MoE(config)
    sharded.load_state_dict(local.state_dict())
    distribute_experts(sharded, mesh, grad_scale=1.0)

    generator = torch.Generator().manual_seed(100 + rank)
    shape = (3, 5, 16) if rank == 0 else (2, 7, 16)  # different token counts per rank
    x = torch.randn(shape, generator=generator)
    x = x.abs() if skewed else x
    probe = torch.randn(shape, generator=generator)
    outputs = []
    for module in (local, sharded):
        x_in = x.clone().requires_grad_()
        out, aux = module(x_in)
        ((out * probe).sum() + sum(aux.values())).backward()
        outputs.append((out.detach(), x_in.grad, {k: v.detach() for k, v in aux.items()}))
    (out_l, dx_l, aux_l), (out_s, dx_s, aux_s) = outputs
    what = (implementation, gated, capacity_factor, skewed, rank)
    assert (out_l - out_s).abs().max() <= 1e-6, what
    assert (dx_l - dx_s).abs().max() <= 1e-6, what
    assert aux_l.keys() == aux_s.keys() and all((aux_l[k] - aux_s[k]).abs() <= 1e-7 for k in aux_l), what
    assert (local.gate.weight.grad - sharded.gate.weight.grad).abs().max() <= 1e-6, what
    # The owner of an expert gets the gradient of every rank's tokens: the sum of the local ones.
    L = 4 // world_size
    for name in ("gate_up_proj" if gated else "up_proj", "down_proj"):
        full = getattr(local.experts, name).grad.clone()
        dist.all_reduce(full)
        mine = getattr(sharded.experts, name).grad.to_local()
        assert mine.shape[0] == L
        assert (full[rank * L : (rank + 1) * L] - mine).abs().max() <= 1e-6, (what, name)
        if skewed and rank == 1:
            assert mine.abs().max() == 0  # no token came: exactly zero, and no hang


def test_dispatch_and_combine_match_the_local_moe_layer():
    spawn(_dispatch_worker, 2, ())


# --- training ----------------------------------------------------------------------------------


def _config(data: Path, output: Path, ep: int, model: dict = MOE, **overrides) -> dict:
    settings = dict(
        batch={"global_batch_size": 4, "micro_batch_size": 1},
        stop={"max_steps": STEPS},
        checkpoint={"every_steps": 3},
        eval={"at_end": True, "max_sequences": 3},
        deterministic=True,
        parallel={"expert_parallel": ep},
    )
    return train_config(data, output, model_config=model, **{**settings, **overrides})


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory) -> Path:
    """Every run of the training tests, once: 4 processes, then 2, then this process."""
    root = tmp_path_factory.mktemp("expert-parallel")
    four = [
        (_config(prepared_data, root / "w4-ep2", 2), False, None),
        (_config(prepared_data, root / "w4-ep4", 4, activation_checkpointing=True), False, None),
    ]
    spawn(_train_worker, 4, (four,))
    resumed_2 = root / "w4-ep2-resumed-on-2"
    two = [
        (_config(prepared_data, root / "w2-ep2", 2), False, None),
        (_config(prepared_data, resumed_2, 1), True, (str(root / "w4-ep2"), str(resumed_2))),
    ]
    spawn(_train_worker, 2, (two,))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(prepared_data, root / "w1", 1), quiet=True)
        _copy_without_last(str(root / "w4-ep2"), str(root / "w4-ep2-resumed-on-1"))
        train(_config(prepared_data, root / "w4-ep2-resumed-on-1", 1), resume=True, quiet=True)
    finally:
        torch.set_num_threads(previous)
    return root


def _records(output: Path, kind: str) -> list[dict]:
    return [r for r in read_records(output / "metrics.jsonl") if r["kind"] == kind]


def _max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("run", ["w2-ep2", "w4-ep2", "w4-ep4"])
def test_expert_parallel_losses_equal_one_process(runs: Path, run: str):
    one, many = _records(runs / "w1", "train"), _records(runs / run, "train")
    assert [r["step"] for r in many] == list(range(1, STEPS + 1))
    for key in ("loss", "lm_loss", "grad_norm"):
        difference = _max_difference([r[key] for r in one], [r[key] for r in many])
        assert difference < TOLERANCE, (run, key, difference)
    aux_one = [r["aux_losses"]["moe_load_balancing"] for r in one]
    assert _max_difference(aux_one, [r["aux_losses"]["moe_load_balancing"] for r in many]) < TOLERANCE
    assert [r["expert_load"] for r in one] == [r["expert_load"] for r in many]
    eval_one, eval_many = _records(runs / "w1", "eval")[-1], _records(runs / run, "eval")[-1]
    for domain, scores in eval_one["domains"].items():
        assert abs(scores["loss"] - eval_many["domains"][domain]["loss"]) < TOLERANCE, (run, domain)
    single = load_file(runs / "w1" / "final" / "model.safetensors")
    sharded = load_file(runs / run / "final" / "model.safetensors")
    assert {k: v.shape for k, v in single.items()} == {k: v.shape for k, v in sharded.items()}
    assert all(torch.allclose(single[k], sharded[k], atol=1e-5) for k in single)


@pytest.mark.parametrize("resumed", ["w4-ep2-resumed-on-2", "w4-ep2-resumed-on-1"])
def test_checkpoint_of_four_processes_resumes_on_fewer(runs: Path, resumed: str):
    saved = load_file(runs / "w4-ep2" / "checkpoints" / "step-00000003" / "model" / "model.safetensors")
    assert saved["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * MOE["intermediate_size"], 32)
    assert saved["model.layers.1.mlp.experts.down_proj"].shape == (4, 32, MOE["intermediate_size"])
    original, continued = _records(runs / "w4-ep2", "train"), _records(runs / resumed, "train")
    assert [r["step"] for r in continued] == [1, 2, 3, 4, 5]  # the copied log, then steps 4 and 5
    difference = _max_difference([r["loss"] for r in original], [r["loss"] for r in continued])
    assert difference < TOLERANCE, (resumed, difference)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ep", "world_size", "model", "fragment"),
    [
        (2, 1, MOE, "parallel.expert_parallel 2 does not divide the 1 rank(s)"),
        (4, 6, MOE, "parallel.expert_parallel 4 does not divide the 6 rank(s)"),
        (3, 6, MOE, "parallel.expert_parallel 3 does not divide the model's 4 experts"),
        (2, 2, {k: v for k, v in MOE.items() if k != "moe"}, "has no MoE layer"),
    ],
)
def test_bad_expert_parallel_is_refused(prepared_data, tmp_path, ep, world_size, model, fragment):
    batch = {"global_batch_size": 12, "micro_batch_size": 1}
    config = TrainConfig(**_config(prepared_data, tmp_path / "out", ep, model, batch=batch))
    with pytest.raises(UpcycleError) as error:
        plan_run(config, world_size, resume=False)
    assert fragment in str(error.value)
    assert str(error.value).count(". ") == 0  # one sentence


def test_expert_parallel_key_is_validated():
    with pytest.raises(ValueError, match="expert_parallel"):
        TrainConfig.model_validate(
            {
                "model": {"config": MOE},
                "data": {"path": "d", "seq_len": 8},
                "batch": {"global_batch_size": 1},
                "stop": {"max_steps": 1},
                "output": "o",
                "parallel": {"expert_parallel": 0},
            }
        )


def test_compiled_blocks_with_expert_parallelism(prepared_data, tmp_path):
    """`compile: true` with ep 2 (the dispatch runs eagerly inside the compiled block: its split
    sizes are data) gives the losses of compiled ep 1 on the same 2 ranks."""
    stop, no_eval = {"max_steps": 2}, {"at_end": False}
    jobs = [
        (_config(prepared_data, tmp_path / "ep2", 2, compile=True, stop=stop, eval=no_eval), False, None),
        (_config(prepared_data, tmp_path / "ep1", 1, compile=True, stop=stop, eval=no_eval), False, None),
    ]
    spawn(_train_worker, 2, (jobs,), timeout=500)
    ep2, ep1 = (_records(tmp_path / name, "train") for name in ("ep2", "ep1"))
    assert len(ep2) == len(ep1) == 2
    assert _max_difference([r["loss"] for r in ep2], [r["loss"] for r in ep1]) <= 1e-6


def test_bf16_weights_with_expert_parallelism(prepared_data, tmp_path):
    """`precision: bf16-weights` with the experts sharded over 2 ranks: the fp32 routers get FSDP
    units of their own beside the bf16 blocks, and the run trains as one process does within
    bf16 rounding."""
    config = _config(prepared_data, tmp_path / "ep2", 2, precision="bf16-weights", eval={"at_end": False})
    spawn(_train_worker, 2, ([(config, False, None)],))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(
            _config(prepared_data, tmp_path / "one", 1, precision="bf16-weights", eval={"at_end": False}),
            quiet=True,
        )
    finally:
        torch.set_num_threads(previous)
    one, two = ([r["loss"] for r in _records(tmp_path / run, "train")] for run in ("one", "ep2"))
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) / a for a, b in zip(one, two, strict=True)) < 1e-2, (one, two)
