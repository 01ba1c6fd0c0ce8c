"""Exact resume: a run SIGKILLed after step 10's checkpoint and resumed matches an uninterrupted
run bit for bit (per-step losses, gradient norms, final weights, sampler state); plus the
checkpoint layout, keep-last-k and what `--resume` does with no checkpoint.

The model routes with sample_top1, whose Gumbel noise comes from the torch RNG, so the losses
after the resume only match if the RNG states were restored too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
import yaml
from cli_helpers import assert_refused, run_cli
from safetensors.torch import load_file
from test_train_helpers import (  # noqa: F401
    MOE,
    SUBPROCESS_ENV,
    one_thread,
    prepared_data_fixture,
    train_config,
    train_records,
)

from upcycle.train import complete_checkpoints, train

SAMPLE_TOP1 = {**MOE, "moe": {"num_experts": 4, "routing": "sample_top1", "implementation": "eager"}}

# Runs `upcycle train` with one change: after step 10's checkpoint is complete it says so and
# waits, so that the test can SIGKILL it at a known point.
KILLABLE = """
import sys, time
import upcycle.train.checkpointing as checkpointing
original_save = checkpointing.Checkpointer.save
def save(self, step, *args, **kwargs):
    folder = original_save(self, step, *args, **kwargs)
    if step == 10:
        print("checkpoint 10 saved", flush=True)
        time.sleep(600)
    return folder
checkpointing.Checkpointer.save = save
from upcycle.cli import main
sys.exit(main(["train", sys.argv[1], "--quiet"]))
"""


def _config(data, output) -> dict:
    return train_config(
        data,
        output,
        model_config=SAMPLE_TOP1,
        stop={"max_steps": 20},
        checkpoint={"every_steps": 5, "keep_last_k": 2},
        eval={"every_steps": 5, "at_end": True, "max_sequences": 2},
    )


def _run_until_killed(config_path) -> None:
    env = {**os.environ, **SUBPROCESS_ENV}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        assert line.strip() == "checkpoint 10 saved", (line, process.stderr.read())
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("tokens_per_s", "mfu", "mfu_datasheet")}


def test_sigkilled_run_resumes_bit_for_bit(prepared_data, tmp_path):
    straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
    train(_config(prepared_data, straight_out), quiet=True)

    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(_config(prepared_data, killed_out)))
    _run_until_killed(config_path)
    assert [step for step, _ in complete_checkpoints(killed_out / "checkpoints")] == [5, 10]
    assert not (killed_out / "final").exists()

    with open(killed_out / "metrics.jsonl", "a") as metrics:  # as if killed in the middle of a line
        metrics.write('{"kind": "train", "step": 11, "lo')
    result = run_cli("train", config_path, "--resume", "--quiet")
    assert result.returncode == 0, result.stderr

    straight = [_comparable(r) for r in train_records(straight_out)]
    resumed = [_comparable(r) for r in train_records(killed_out)]
    assert [r["step"] for r in resumed] == list(range(1, 21))
    assert resumed == straight  # losses, aux losses, grad norms, lr, expert loads: exact floats
    evals = [json.loads(line) for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [5, 10, 15, 20]

    for name in ("model.safetensors",):
        a, b = load_file(straight_out / "final" / name), load_file(killed_out / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [
        json.loads((out / "checkpoints" / "step-00000020" / "trainer_state.json").read_text())
        for out in (straight_out, killed_out)
    ]
    assert states[0]["data"] == states[1]["data"]  # the sampler continued exactly
    assert states[1]["data"]["sampler"]["samples_seen"] == 20 * 8
    assert [s for s, _ in complete_checkpoints(killed_out / "checkpoints")] == [15, 20]  # keep_last_k 2


def test_checkpoint_folder_holds_every_part(prepared_data, tmp_path):
    config = train_config(
        prepared_data, tmp_path / "out", stop={"max_steps": 2}, checkpoint={"every_steps": 2}
    )
    train(config, quiet=True)
    folder = tmp_path / "out" / "checkpoints" / "step-00000002"
    names = {p.name for p in folder.iterdir()}
    assert names == {"model", "optimizer.pt", "rng.pt", "trainer_state.json", "COMPLETE"}
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["step"], state["tokens"]) == (2, 2 * 8 * 32)
    assert state["flops"] > 0 and state["schedule"]["warmup_steps"] == 5
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert "model.layers.0.mlp.gate.weight" in optimizer["state"]  # keyed by parameter name
    from upcycle.checkpoint import load_model

    assert load_model(folder / "model").config.moe.num_experts == 4
    final = tmp_path / "out" / "final"
    assert (final / "tokenizer.json").is_file() and (final / "config.json").is_file()


def test_resume_without_checkpoint_starts_fresh_and_fresh_run_refuses_old_output(prepared_data, tmp_path):
    config = train_config(
        prepared_data, tmp_path / "out", stop={"max_steps": 1}, checkpoint={"every_steps": 1}
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_cli("train", path, "--resume", "--quiet").returncode == 0
    assert_refused(run_cli("train", path, "--quiet"), "already holds checkpoints up to step 1", "--resume")
    again = run_cli("train", path, "--resume", "--quiet")  # already finished: nothing to do, same model
    assert again.returncode == 0 and len(train_records(tmp_path / "out")) == 1
