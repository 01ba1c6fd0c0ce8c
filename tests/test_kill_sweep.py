"""SIGKILL sweep over `upcycle convert`: whatever the moment of the kill, afterwards OUT_DIR is
absent or complete, a previous complete output is intact, and the next run cleans up and succeeds.

Each seed picks a kill point and whether an earlier complete output is being overwritten:
- `bytes`: when the staging folder holds a random fraction of the output's safetensors bytes
  (the approach of tests/test_convert_kill.py);
- `validation`: at a random time before the staging folder exists (YAML, sources, headers, plan);
- `time`: at a random time over the whole run, which also reaches the final writes and renames.

After the kill: a fresh target is absent or byte-identical to the reference output; an
overwritten target holds the previous output or the new one byte for byte, or, killed between
the two renames of an overwrite, is absent with the previous output complete in its `-old-`
staging folder. The next run must succeed, remove what the killed run left beside the target,
restore nothing it should not, leave unrelated files alone, and write the reference bytes.

To spend the time on conversions rather than on interpreter start-up, the runs are forked from
one Python process that has already imported upcycle (tests/kill_helpers.py's fork server); each
run is a separate process executing `upcycle.cli.main(argv)`, killed with SIGKILL by this test
(tests/test_convert_kill.py covers the same kills on freshly exec'ed `python -m upcycle`
processes).

`UPCYCLE_KILL_SEEDS` sets the number of seeds: 3 by default (one per kill mode), 20 for the full
sweep of issue 9 (`UPCYCLE_KILL_SEEDS=20 pytest tests/test_kill_sweep.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from kill_helpers import ForkServer, OutputSeed, kill_after, seeds, tree_digest, was_killed

from upcycle.checkpoint.loading import load_model

SEEDS = seeds(3)
MODES = ("bytes", "validation", "time")


def staging_folders(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.staging-*[0-9]-*"))


def staged_bytes(parent: Path, name: str) -> int:
    total = 0
    for folder in staging_folders(parent, name):
        if "-old-" in folder.name:
            continue
        with contextlib.suppress(FileNotFoundError):  # renamed or removed while we looked
            total += sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return total


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The fork server, a 2M-parameter source, the reference 8-expert output (33 MB, its run
    timed), and a previous 4-expert output to overwrite."""
    root = tmp_path_factory.mktemp("kill_sweep")
    config = transformers.LlamaConfig(
        vocab_size=2000,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    source = root / "dense"
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    configs = {}
    for experts in (8, 4):
        configs[experts] = root / f"e{experts}.yaml"
        configs[experts].write_text(
            yaml.safe_dump({"recipe": "sparse", "sources": [str(source)], "num_experts": experts})
        )
    server = ForkServer(root / "logs")

    assert server.run("convert", configs[4], root / "previous", "--quiet") == 0  # also warms up
    reference = root / "reference"
    server.start("convert", configs[8], reference, "--quiet")
    started, staging_after = time.monotonic(), None
    while (message := server.finished(timeout=0.002)) is None:
        if staging_after is None and staging_folders(root, "reference"):
            staging_after = time.monotonic() - started
    duration = time.monotonic() - started
    assert os.waitstatus_to_exitcode(message["status"]) == 0, server.log().read_text()
    yield {
        "root": root,
        "server": server,
        "config": configs[8],
        "reference": tree_digest(reference),
        "previous_dir": root / "previous",
        "previous": tree_digest(root / "previous"),
        "total_bytes": sum(f.stat().st_size for f in reference.glob("*.safetensors")),
        "duration": duration,
        "validation": staging_after or duration / 4,
    }
    server.close()
    print(f"\nkill sweep: one conversion takes {duration:.2f} s, {staging_after or 0:.2f} s before staging")


def kill_at_bytes(server: ForkServer, pid: int, parent: Path, name: str, at_bytes: int):
    """SIGKILL once the staging folder holds `at_bytes` of safetensors; (outcome, wait status)."""
    while (message := server.finished()) is None:
        if staged_bytes(parent, name) >= at_bytes:
            os.kill(pid, signal.SIGKILL)
            return f"killed at {at_bytes / 1e6:.1f} MB", server.wait(120)
        time.sleep(0.001)
    return "finished first", message["status"]


@pytest.mark.parametrize("seed", range(SEEDS))
def test_sigkill_at_a_random_point(sweep, seed):
    run = OutputSeed(sweep, seed, MODES)
    rng, mode, overwrite, out = run.rng, run.mode, run.overwrite, run.out
    server, parent, name = sweep["server"], out.parent, out.name

    pid = server.start("convert", sweep["config"], out, "--quiet", *(["--overwrite"] if overwrite else []))
    if mode == "bytes":
        at_bytes = int(rng.uniform(0.0, 1.0) * sweep["total_bytes"])
        outcome, status = kill_at_bytes(server, pid, parent, name, at_bytes)
    elif mode == "validation":
        outcome, status = kill_after(server, pid, rng.uniform(0.0, sweep["validation"]))
    else:
        outcome, status = kill_after(server, pid, rng.uniform(0.0, sweep["duration"]))
    assert status is not None, "the killed process was not reaped"
    assert was_killed(status) or os.waitstatus_to_exitcode(status) == 0, (parent, outcome, status)

    left = [p.name for p in staging_folders(parent, name)]
    state = run.state_after_kill((seed, outcome, left))
    print(
        f"seed {seed:2d} {mode:10s} overwrite={overwrite!s:5s} {outcome:24s} OUT_DIR {state:19s} "
        f"staging folders left {len(left)}",
        end=" ",
    )

    # The next run: a user re-runs the same command, adding --overwrite if the output now exists.
    again = ["--overwrite"] if overwrite or out.exists() else []
    code = server.run("convert", sweep["config"], out, "--quiet", *again)
    assert code == 0, server.log().read_text()
    assert staging_folders(parent, name) == [], "the next run left staging folders"
    run.check_next_run()
    print("-> next run ok")
    if seed == SEEDS - 1:
        load_model(out)  # the output is loadable, not only byte-identical


@pytest.mark.parametrize("renames", [1, 2], ids=["after_moving_the_old_aside", "after_moving_the_new_in"])
def test_sigkill_between_the_renames_of_an_overwrite(sweep, renames):
    """The two renames of an overwrite are microseconds apart, so random kills rarely land there;
    here the process kills itself right after the first (old output aside, new one not yet in
    place) or the second (new output in place, old one not yet deleted)."""
    server, parent = sweep["server"], sweep["root"] / f"renames{renames}"
    parent.mkdir()
    out = parent / "out"
    shutil.copytree(sweep["previous_dir"], out)
    server.start("convert", sweep["config"], out, "--quiet", "--overwrite", die_after_renames=renames)
    assert was_killed(server.wait(120))
    asides = [p for p in staging_folders(parent, "out") if "-old-" in p.name]
    assert len(asides) == 1 and tree_digest(asides[0]) == sweep["previous"]
    if renames == 1:
        assert not out.exists()
        # Re-run without --overwrite: the previous output comes back and is not replaced.
        assert server.run("convert", sweep["config"], out, "--quiet") == 2
        assert "already exists" in server.log().read_text()
        assert tree_digest(out) == sweep["previous"]
    else:
        assert tree_digest(out) == sweep["reference"]

    assert server.run("convert", sweep["config"], out, "--quiet", "--overwrite") == 0
    assert tree_digest(out) == sweep["reference"]
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
