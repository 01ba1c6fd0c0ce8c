"""SIGKILL sweep over `upcycle train`: wherever the kill lands, every checkpoint under its name is
complete and byte-identical to the unkilled run's, `final/` is absent or complete, and
`upcycle train --resume` finishes the run with per-step metrics (training and evaluation records)
bit-identical to the unkilled run, the same final model, and no leftovers.

The run: the tiny sample_top1 MoE of tests/test_train_resume.py (its Gumbel noise makes the
losses depend on the restored RNG states), 20 steps, a checkpoint every 5 keeping the last 2,
evaluation every 5 steps. Each seed picks one kill point:
- `time`: a random moment of the whole run (building, steps, evaluations, saves, the final model);
- `bytes`: inside the save of a random checkpoint, once its staging folder holds a random number
  of bytes (0 to all of them: the weights, optimizer.pt, rng.pt, the JSON state, the marker);
- `renames`: right after a random folder rename (a checkpoint moved into place before the old
  one is pruned, an old checkpoint moved aside for deletion, the final model moved into place);
- `prune`: halfway through deleting a checkpoint beyond keep_last_k.

`UPCYCLE_KILL_SEEDS` sets the number of seeds: 4 by default (one per kill point), 20 for the
sweep of issue 9.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from kill_helpers import ForkServer, hidden_leftovers, kill_after, seed_run, seeds, tree_digest, was_killed
from test_train_helpers import MOE, prepared_data_fixture, train_config  # noqa: F401

from upcycle.train import complete_checkpoints
from upcycle.train.metrics import read_records

SEEDS = seeds(4)
MODES = ("time", "bytes", "renames", "prune")
STEPS, EVERY = 20, 5
SAVES = list(range(EVERY, STEPS + 1, EVERY))
SAMPLE_TOP1 = {**MOE, "moe": {"num_experts": 4, "routing": "sample_top1", "implementation": "eager"}}
WRITERS = ["upcycle.checkpoint.safetensors_io", "upcycle.train.checkpointing", "upcycle.checkpoint.atomic"]
TIMING = ("tokens_per_s", "mfu", "mfu_datasheet")
STATE = ("trainer_state.json", "COMPLETE")  # they name the run's folder and the time


def config(data: Path, output: Path, keep_last_k: int | None) -> dict:
    return train_config(
        data,
        output,
        model_config=SAMPLE_TOP1,
        stop={"max_steps": STEPS},
        checkpoint={"every_steps": EVERY, "keep_last_k": keep_last_k},
        eval={"every_steps": EVERY, "at_end": True, "max_sequences": 2},
        log={"tensorboard": False, "progress": False},
    )


def records(output: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(output / "metrics.jsonl")]


@pytest.fixture(scope="module")
def sweep(prepared_data, tmp_path_factory):
    """The fork server; the unkilled run (keeping every checkpoint, to compare each) timed; the
    bytes of one checkpoint; the number of folder renames of a run that keeps the last 2."""
    root = tmp_path_factory.mktemp("train_kill_sweep")
    server = ForkServer(root / "logs")
    reference = root / "reference"
    path = root / "reference.yaml"
    path.write_text(yaml.safe_dump(config(prepared_data, reference, None)))
    assert server.run("train", path, "--quiet") == 0, server.log().read_text()
    checkpoints = {s: tree_digest(f, skip=STATE) for s, f in complete_checkpoints(reference / "checkpoints")}
    assert sorted(checkpoints) == SAVES
    folder = reference / "checkpoints" / f"step-{EVERY:08d}"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    renames = len(SAVES) + (len(SAVES) - 2) + 1  # each save, each prune, the final model
    timed = root / "timed.yaml"  # what each seed runs, now that the first run warmed up the server
    timed.write_text(yaml.safe_dump(config(prepared_data, root / "timed", 2)))
    started = time.monotonic()
    assert server.run("train", timed, "--quiet") == 0, server.log().read_text()
    duration = time.monotonic() - started
    assert records(root / "timed") == records(reference)  # keep_last_k changes no number
    yield {
        "root": root,
        "server": server,
        "data": prepared_data,
        "records": records(reference),
        "checkpoints": checkpoints,
        "final": tree_digest(reference / "final"),
        "size": size,
        "renames": renames,
        "duration": duration,
    }
    server.close()
    print(f"\ntrain kill sweep: one run takes {duration:.2f} s, a checkpoint is {size / 1e3:.0f} kB")


def check_after_kill(sweep: dict, out: Path) -> str:
    """Everything visible is complete and equals the unkilled run; a short description."""
    checkpoints = out / "checkpoints"
    steps = []
    if checkpoints.is_dir():
        for entry in sorted(checkpoints.iterdir()):
            if entry.name.startswith("."):
                continue  # a killed save's staging folder, or a checkpoint moved aside to delete
            match = re.fullmatch(r"step-(\d{8})", entry.name)
            assert match, f"unexpected {entry}"
            step = int(match[1])
            assert (entry / "COMPLETE").is_file(), f"{entry.name} is visible but not complete"
            assert tree_digest(entry, skip=STATE) == sweep["checkpoints"][step], f"{entry.name} differs"
            state = json.loads((entry / "trainer_state.json").read_text())
            assert state["step"] == step
            steps.append(step)
    assert len(steps) <= 3, steps  # keep_last_k 2, plus the newest one before the oldest is pruned
    final = out / "final"
    if final.exists():
        assert tree_digest(final) == sweep["final"], "final/ is visible but differs"
    kept = records(out) if (out / "metrics.jsonl").exists() else []
    assert kept == sweep["records"][: len(kept)], "the metrics so far differ from the unkilled run"
    return f"checkpoints {steps}, final {'yes' if final.exists() else 'no'}, leftovers {len(hidden_leftovers(out))}"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_sigkill_then_resume(sweep, seed):
    rng, mode, out, path = seed_run(sweep, seed, MODES, lambda out: config(sweep["data"], out, 2))
    server = sweep["server"]

    if mode == "time":
        pid = server.start("train", path, "--quiet")
        outcome, status = kill_after(server, pid, rng.uniform(0, sweep["duration"]))
    elif mode == "bytes":
        step, at_bytes = rng.choice(SAVES), rng.randrange(sweep["size"] + 1)
        hook = {"marker": f".step-{step:08d}.staging-", "bytes": at_bytes, "modules": WRITERS}
        outcome = f"in checkpoint {step} at byte {at_bytes}"
        server.start("train", path, "--quiet", die_at_bytes=hook)
        status = server.wait()
    elif mode == "renames":
        count = rng.randint(1, sweep["renames"])
        outcome = f"after rename {count} of {sweep['renames']}"
        server.start("train", path, "--quiet", die_after_renames=count)
        status = server.wait()
    else:
        outcome = "halfway through pruning the first old checkpoint"
        server.start("train", path, "--quiet", die_in_rmtree=".pruned-")
        status = server.wait()
    finished = os.waitstatus_to_exitcode(status) == 0 and mode == "time"  # the kill came too late
    assert was_killed(status) or finished, (seed, outcome, status, server.log().read_text())
    state = check_after_kill(sweep, out)
    print(f"seed {seed:2d} {mode:8s} {outcome:40s} {state}", end=" ")

    assert server.run("train", path, "--resume", "--quiet") == 0, server.log().read_text()
    assert records(out) == sweep["records"]  # every training and evaluation record, exact floats
    assert tree_digest(out / "final") == sweep["final"]
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == SAVES[-2:]
    assert hidden_leftovers(out) == [], "the resumed run left a killed run's files"
    print("-> resumed bit for bit")
    shutil.rmtree(out)
