"""`branches.launch: parallel`: branches as separate processes, one GPU group each on a GPU
machine (torchrun with FSDP2 for a group of several), CPU processes otherwise.

The placement is checked as a plan (which GPUs, which command, which environment). The end-to-end
test runs the reduced pipeline on this CPU machine with the launcher told that two GPUs exist and
`gpus_per_branch: 2`: every branch then really runs as a 2-process torchrun job (gloo on CPU,
`CUDA_VISIBLE_DEVICES` set but unused), and its model must equal the one the sequential launch
trains, since 2-rank FSDP2 gives the 1-process losses (tests/test_train_distributed.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import reduced_pipeline

from upcycle.checkpoint.loading import load_model
from upcycle.errors import UpcycleError
from upcycle.pipeline import run as pipeline_run
from upcycle.pipeline import run_pipeline
from upcycle.pipeline.run import branch_command, plan_branch_launches


def test_one_gpu_per_branch_as_many_at_once_as_gpus():
    plan = plan_branch_launches(
        branches=4, gpus=[0, 1, 2, 3, 4, 5, 6, 7], gpus_per_branch=1, max_parallel=None
    )
    assert plan.groups == ((0,), (1,), (2,), (3,))  # never more slots than branches


def test_gpu_groups_for_multi_gpu_branches_and_the_cap():
    plan = plan_branch_launches(
        branches=4, gpus=[0, 1, 2, 3, 4, 5, 6, 7], gpus_per_branch=2, max_parallel=None
    )
    assert plan.groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    capped = plan_branch_launches(
        branches=4, gpus=[0, 1, 2, 3, 4, 5, 6, 7], gpus_per_branch=2, max_parallel=2
    )
    assert capped.groups == ((0, 1), (2, 3))
    leftover = plan_branch_launches(branches=4, gpus=[2, 3, 5], gpus_per_branch=2, max_parallel=None)
    assert leftover.groups == ((2, 3),)  # GPU 5 alone cannot hold a 2-GPU branch


def test_cpu_slots_default_to_two():
    plan = plan_branch_launches(branches=4, gpus=[], gpus_per_branch=1, max_parallel=None)
    assert plan.groups == ((), ())
    assert plan_branch_launches(branches=1, gpus=[], gpus_per_branch=1, max_parallel=None).groups == ((),)


def test_too_many_gpus_per_branch_is_refused():
    with pytest.raises(UpcycleError, match="gpus_per_branch is 4 but only 2 GPU"):
        plan_branch_launches(branches=2, gpus=[0, 1], gpus_per_branch=4, max_parallel=None)


def test_branch_commands():
    path = Path("/runs/x/branches/code/train.yaml")
    command, env = branch_command(path, (), 3)
    assert command == [sys.executable, "-m", "upcycle", "train", str(path), "--resume"]
    assert env == {"OMP_NUM_THREADS": "3"}
    command, env = branch_command(path, (5,), 3)
    assert command == [sys.executable, "-m", "upcycle", "train", str(path), "--resume"]
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    command, env = branch_command(path, (2, 3), 3)
    assert command[:5] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
    ]
    assert command[5:] == ["-m", "upcycle", "train", str(path), "--resume"]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_group_indices_map_through_the_parents_visible_devices():
    path = Path("/runs/x/branches/code/train.yaml")
    _, env = branch_command(path, (0,), 1, parent_visible="4,5")
    assert env["CUDA_VISIBLE_DEVICES"] == "4"
    _, env = branch_command(path, (0, 1), 1, parent_visible="GPU-aaa, GPU-bbb")
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaa,GPU-bbb"


def test_threads_are_split_over_every_process_of_every_group(monkeypatch):
    monkeypatch.setattr(pipeline_run.os, "cpu_count", lambda: 16)
    plan = plan_branch_launches(
        branches=2, gpus=[0, 1, 2, 3, 4, 5, 6, 7], gpus_per_branch=4, max_parallel=None
    )
    assert plan.threads == 2  # 2 groups x 4 processes on 16 cores


def test_a_gpu_listed_twice_is_refused():
    with pytest.raises(UpcycleError, match="lists a GPU twice"):
        pipeline_run.visible_gpus([0, 0])


def test_unknown_gpu_index_is_refused():
    with pytest.raises(UpcycleError, match=r"branches\.gpus names GPU 7"):
        pipeline_run.visible_gpus([7])


def _branch_models(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {d: load_model(out / "branches" / d / "final").state_dict() for d in ("code", "math")}


def test_branches_as_two_process_torchrun_jobs_match_the_sequential_launch(tmp_path, monkeypatch, capfd):
    mixes = [{"name": "btx", "recipe": "btx"}]
    sequential = tmp_path / "sequential"
    run_pipeline(reduced_pipeline(sequential, mixes=mixes), quiet=True)
    capfd.readouterr()
    monkeypatch.setattr(pipeline_run, "visible_gpus", lambda wanted=None: [0, 1])
    parallel = tmp_path / "parallel"
    config = reduced_pipeline(parallel, mixes=mixes)
    config["branches"] = {**config["branches"], "launch": "parallel", "gpus_per_branch": 2}
    run_pipeline(config, quiet=True)
    launched = capfd.readouterr().err  # the branch processes inherit stderr
    assert launched.count("steps of 128 tokens on 2 × cpu") == 2, launched  # both ran on 2 ranks
    expected, got = _branch_models(sequential), _branch_models(parallel)
    for domain in expected:
        for name, tensor in expected[domain].items():
            torch.testing.assert_close(got[domain][name], tensor, rtol=0, atol=1e-6, msg=f"{domain} {name}")
