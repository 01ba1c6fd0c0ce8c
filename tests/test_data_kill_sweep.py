"""SIGKILL sweep over `upcycle data prepare`: whatever the moment of the kill, OUT_DIR is absent or
complete (byte-identical to an unkilled run's), a previous complete output being replaced is
intact, and the next run of the same command cleans up, leaves unrelated files alone and writes
the reference bytes.

Three domains of generated JSONL (about 2.4 MB of text, 1.3M tokens) with the byte-level BPE of
tests/test_train_helpers.py. Each seed picks a kill point, and odd seeds replace an earlier
output (prepared with another held-out split, so its fingerprint differs):
- `time`: a random moment of the whole run (tokenizer and sources, tokenising, the split copy,
  the manifest, the renames);
- `bytes`: once the staging folder holds a random number of the bytes the run writes there (the
  working copy, the shards, the manifest);
- `renames`: right after the first or the second folder rename (the old output moved aside, the
  new one moved into place).

`UPCYCLE_KILL_SEEDS` sets the number of seeds: 3 by default (one per kill point), 20 for the
sweep of issue 9.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml
from kill_helpers import ForkServer, OutputSeed, hidden_leftovers, kill_after, seeds, tree_digest, was_killed
from test_train_helpers import prepared_data_fixture  # noqa: F401

from upcycle.data.synthetic import synthetic_documents

SEEDS = seeds(3)
MODES = ("time", "bytes", "renames")
WRITERS = ["upcycle.data.shards", "upcycle.data.manifest"]


@pytest.fixture(scope="module")
def sweep(prepared_data, tmp_path_factory):
    """The fork server, the sources and config, the reference output (its run timed, the bytes it
    wrote into its staging folder counted) and a previous output to replace."""
    root = tmp_path_factory.mktemp("data_kill_sweep")
    domains = {}
    for name, seed in (("code", 11), ("math", 12), ("prose", 13)):
        path = root / f"{name}.jsonl"
        documents = synthetic_documents(1000, seed=seed, mean_words=120)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        domains[name] = {"paths": [str(path)]}
    config = {"domains": domains, "tokenizer": str(prepared_data.parent / "tokenizer"), "num_workers": 1}
    configs = {}
    for name, fraction in (("new", 0.1), ("previous", 0.2)):
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**config, "heldout": {"fraction": fraction}}))
    server = ForkServer(root / "logs")
    assert server.run("data", "prepare", configs["previous"], root / "previous", "--quiet") == 0
    started = time.monotonic()
    assert server.run("data", "prepare", configs["new"], root / "reference", "--quiet") == 0
    duration = time.monotonic() - started
    final_bytes = sum(f.stat().st_size for f in (root / "reference").rglob("*") if f.is_file())
    yield {
        "root": root,
        "server": server,
        "config": configs["new"],
        "reference": tree_digest(root / "reference"),
        "previous_dir": root / "previous",
        "previous": tree_digest(root / "previous"),
        "staged_bytes": 2 * final_bytes,  # the working copy, then the split shards and manifest
        "duration": duration,
    }
    server.close()
    print(f"\ndata kill sweep: one preparation takes {duration:.2f} s and writes {final_bytes / 1e6:.1f} MB")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_sigkill_at_a_random_point(sweep, seed):
    run = OutputSeed(sweep, seed, MODES)
    rng, mode, overwrite, out = run.rng, run.mode, run.overwrite, run.out
    server = sweep["server"]
    argv = ("data", "prepare", sweep["config"], out, "--quiet")

    if mode == "time":
        pid = server.start(*argv)
        outcome, status = kill_after(server, pid, rng.uniform(0, sweep["duration"]))
    elif mode == "bytes":
        at_bytes = rng.randrange(sweep["staged_bytes"])
        hook = {"marker": ".out.staging-", "bytes": at_bytes, "modules": WRITERS}
        outcome = f"at staged byte {at_bytes / 1e6:.2f} MB"
        server.start(*argv, die_at_bytes=hook)
        status = server.wait()
    else:
        renames = rng.randint(1, 2 if overwrite else 1)
        outcome = f"after rename {renames}"
        server.start(*argv, die_after_renames=renames)
        status = server.wait()
    assert status is not None, "the killed process was not reaped"
    finished = status == 0 and mode != "renames"
    assert was_killed(status) or finished, (seed, outcome, status, server.log().read_text())

    state = run.state_after_kill((seed, outcome))
    print(
        f"seed {seed:2d} {mode:8s} overwrite={overwrite!s:5s} {outcome:26s} OUT_DIR {state:29s} "
        f"leftovers {len(hidden_leftovers(out.parent)) - 1}",
        end=" ",
    )

    # The next run: the user runs the same command again.
    assert server.run(*argv) == 0, server.log().read_text()
    run.check_next_run()
    print("-> next run ok")
