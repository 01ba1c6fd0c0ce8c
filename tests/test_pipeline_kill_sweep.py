"""SIGKILL sweep over `upcycle run`: wherever the kill lands (building the corpus, training its
tokenizer, preparing the data, training the seed or a branch, converting, finetuning, evaluating,
drawing the routing pictures, writing the report), everything visible is complete, and running
the same command again finishes with exactly the evaluation numbers of an unkilled run.

The pipeline is tests/pipeline_helpers.py's reduced one (BTX, BAM, sparse upcycling, dense
continued training, BTM), with checkpoints in the branches too. Each seed picks:
- `time`: a random moment of the whole run;
- `renames`: right after a random one of the run's folder renames (a stage's output moved into
  place before its DONE marker, a checkpoint before the old one is pruned, ...).

`UPCYCLE_KILL_SEEDS` sets the number of seeds: 2 by default (one per kill point), 20 for the
sweep of issue 9 (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from kill_helpers import ForkServer, hidden_leftovers, kill_after, seed_run, seeds, was_killed
from pipeline_helpers import reduced_pipeline

SEEDS = seeds(2)
MODES = ("time", "renames")
TRAIN = {"lr": 3e-3, "warmup_steps": 2, "global_batch_size": 4}


def pipeline(output: Path) -> dict:
    return reduced_pipeline(output, branches={"steps": 4, "train": {**TRAIN, "checkpoint_every_steps": 2}})


def eval_numbers(output: Path) -> dict:
    models = json.loads((output / "eval" / "eval.json").read_text())["models"]
    return {name: model["domains"] for name, model in models.items()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The fork server; the unkilled run, with its folder renames counted, and a second one timed."""
    root = tmp_path_factory.mktemp("pipeline_kill_sweep")
    server = ForkServer(root / "logs")
    path = root / "reference.yaml"
    path.write_text(yaml.safe_dump(pipeline(root / "reference")))
    assert server.run("run", path, "--quiet", die_after_renames=10**9) == 0, server.log().read_text()
    renames = len(re.findall(r"^rename \d+:", server.log().read_text(), flags=re.MULTILINE))
    timed = root / "timed.yaml"  # what each seed runs, now that the first run filled the caches
    timed.write_text(yaml.safe_dump(pipeline(root / "timed")))
    started = time.monotonic()
    assert server.run("run", timed, "--quiet") == 0, server.log().read_text()
    duration = time.monotonic() - started
    assert eval_numbers(root / "timed") == eval_numbers(root / "reference")
    yield {
        "root": root,
        "server": server,
        "eval": eval_numbers(root / "reference"),
        "summary": json.loads((root / "reference" / "summary.json").read_text()),
        "duration": duration,
        "renames": renames,
    }
    server.close()
    print(f"\npipeline kill sweep: one run takes {duration:.1f} s and renames {renames} folders")


def check_after_kill(out: Path) -> str:
    """What is visible under its own name is complete; a short description of how far it got."""
    if not out.exists():
        return "nothing written"
    for checkpoint in out.rglob("step-*"):
        assert (checkpoint / "COMPLETE").is_file(), f"{checkpoint} is visible but not complete"
    for final in out.rglob("final"):
        names = {p.name for p in final.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, f"{final} is incomplete"
    for marker in out.rglob("DONE.json"):
        stage = marker.parent
        json.loads(marker.read_text())
        relative = stage.relative_to(out).parts
        if relative[0] in ("seed", "branches", "finetune"):
            assert (stage / "final" / "model.safetensors").is_file(), stage
        elif relative[0] == "mix":
            assert (stage / "model").is_dir(), stage
        elif relative[0] == "data":
            assert (stage / "manifest.json").is_file(), stage
        elif relative[0] == "eval":
            json.loads((stage / "eval.json").read_text())
        elif relative[0] == "routing":
            json.loads((stage / "routing.json").read_text())
    if (out / "data" / "manifest.json").exists():
        from upcycle.data import load_manifest

        load_manifest(out / "data")  # checks every shard's size
    done = sorted(out.rglob("DONE.json"), key=lambda m: m.stat().st_mtime_ns)
    return f"{len(done)} stages done ({done[-1].parent.relative_to(out) if done else '-'} last)"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_sigkill_then_run_again(sweep, seed):
    rng, mode, out, path = seed_run(sweep, seed, MODES, pipeline)
    server = sweep["server"]

    if mode == "time":
        pid = server.start("run", path, "--quiet")
        outcome, status = kill_after(server, pid, rng.uniform(0, sweep["duration"]))
    else:
        count = rng.randint(1, sweep["renames"])
        outcome = f"after rename {count} of {sweep['renames']}"
        server.start("run", path, "--quiet", die_after_renames=count)
        status = server.wait()
    assert was_killed(status) or (status == 0 and mode == "time"), (seed, outcome, server.log().read_text())
    state = check_after_kill(out)
    print(f"seed {seed:2d} {mode:8s} {outcome:24s} {state}", end=" ")

    assert server.run("run", path, "--quiet") == 0, server.log().read_text()
    assert eval_numbers(out) == sweep["eval"]
    assert json.loads((out / "summary.json").read_text()) == sweep["summary"]
    assert (out / "report" / "report.md").is_file()
    assert hidden_leftovers(out) == [], "the second run left the killed run's files"
    print("-> same numbers")
