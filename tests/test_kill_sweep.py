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
one Python process that has already imported upcycle; each run is a separate process executing
`upcycle.cli.main(argv)`, killed with SIGKILL by this test (tests/test_convert_kill.py covers the
same kills on freshly exec'ed `python -m upcycle` processes).

`UPCYCLE_KILL_SEEDS` sets the number of seeds: 3 by default (one per kill mode), 20 for the full
sweep of issue 9 (`UPCYCLE_KILL_SEEDS=20 pytest tests/test_kill_sweep.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from upcycle.checkpoint.loading import load_model

SEEDS = int(os.environ.get("UPCYCLE_KILL_SEEDS", "3"))
MODES = ("bytes", "validation", "time")

FORK_SERVER = r"""
import json, os, sys, traceback
import torch
import upcycle
from upcycle.cli import main

with torch.device("meta"):  # imports what a first conversion would (torch._dynamo), computing nothing
    torch.nn.Embedding(2, 2)

for line in iter(sys.stdin.readline, ""):
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(log, 2)
        if request.get("die_after_renames"):  # SIGKILL itself right after the n-th folder rename
            real_rename, done = os.rename, []

            def rename(*args, **kwargs):
                real_rename(*args, **kwargs)
                done.append(args)
                if len(done) == request["die_after_renames"]:
                    os.kill(os.getpid(), 9)

            os.rename = rename
        try:
            code = main(request["argv"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "status": status}), flush=True)
"""


class ForkServer:
    """Runs `upcycle` CLI invocations as forked children of one pre-imported interpreter."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # the test's polling needs the other core
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.count = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def start(self, *argv: object, die_after_renames: int = 0) -> int:
        self.count += 1
        log = self.logs / f"run{self.count}.log"
        request = {"argv": [str(a) for a in argv], "log": str(log), "die_after_renames": die_after_renames}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.lines.get(timeout=120)["pid"]

    def finished(self, timeout: float | None = None) -> int | None:
        """The wait status of the running child, or None if it is still running after `timeout`."""
        try:
            return self.lines.get(timeout=timeout)["status"] if timeout else self.lines.get_nowait()["status"]
        except queue.Empty:
            return None

    def run(self, *argv: object) -> int:
        self.start(*argv)
        status = self.finished(timeout=600)
        assert status is not None, "a conversion did not end in 10 minutes"
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # no need to wait for torch's interpreter shutdown
        self.proc.wait(timeout=60)


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


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
    (root / "logs").mkdir()
    server = ForkServer(root / "logs")

    assert server.run("convert", configs[4], root / "previous", "--quiet") == 0  # also warms up
    reference = root / "reference"
    server.start("convert", configs[8], reference, "--quiet")
    started, staging_after = time.monotonic(), None
    while (status := server.finished(timeout=0.002)) is None:
        if staging_after is None and staging_folders(root, "reference"):
            staging_after = time.monotonic() - started
    duration = time.monotonic() - started
    assert os.waitstatus_to_exitcode(status) == 0, (root / "logs" / "run2.log").read_text()
    yield {
        "root": root,
        "server": server,
        "config": configs[8],
        "reference": folder_digest(reference),
        "previous_dir": root / "previous",
        "previous": folder_digest(root / "previous"),
        "total_bytes": sum(f.stat().st_size for f in reference.glob("*.safetensors")),
        "duration": duration,
        "validation": staging_after or duration / 4,
    }
    server.close()
    print(f"\nkill sweep: one conversion takes {duration:.2f} s, {staging_after or 0:.2f} s before staging")


def kill_at_bytes(server: ForkServer, pid: int, parent: Path, name: str, at_bytes: int):
    """SIGKILL once the staging folder holds `at_bytes` of safetensors; (outcome, wait status)."""
    while (status := server.finished()) is None:
        if staged_bytes(parent, name) >= at_bytes:
            os.kill(pid, signal.SIGKILL)
            return f"killed at {at_bytes / 1e6:.1f} MB", server.finished(timeout=120)
        time.sleep(0.001)
    return "finished first", status


def kill_after(server: ForkServer, pid: int, delay: float):
    """SIGKILL `delay` seconds after the start; (outcome, wait status)."""
    status = server.finished(timeout=delay) if delay > 0 else None
    if status is not None:
        return "finished first", status
    os.kill(pid, signal.SIGKILL)
    return f"killed after {delay:.3f} s", server.finished(timeout=120)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_sigkill_at_a_random_point(sweep, seed):
    rng = random.Random(seed)
    mode, overwrite = MODES[seed % len(MODES)], seed % 2 == 1
    root, server = sweep["root"], sweep["server"]
    parent = root / f"seed{seed}"
    parent.mkdir()
    name, out = "out", parent / "out"
    unrelated = parent / ".out.staging-notes"  # looks like a staging name, is not one: must survive
    unrelated.write_text("keep me")
    if overwrite:
        shutil.copytree(sweep["previous_dir"], out)

    pid = server.start("convert", sweep["config"], out, "--quiet", *(["--overwrite"] if overwrite else []))
    if mode == "bytes":
        at_bytes = int(rng.uniform(0.0, 1.0) * sweep["total_bytes"])
        outcome, status = kill_at_bytes(server, pid, parent, name, at_bytes)
    elif mode == "validation":
        outcome, status = kill_after(server, pid, rng.uniform(0.0, sweep["validation"]))
    else:
        outcome, status = kill_after(server, pid, rng.uniform(0.0, sweep["duration"]))
    assert status is not None, "the killed process was not reaped"
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or os.waitstatus_to_exitcode(status) == 0, (parent, outcome, status)

    left = [p.name for p in staging_folders(parent, name)]
    asides = [p for p in staging_folders(parent, name) if "-old-" in p.name]
    if out.exists():
        names = {sweep["reference"]: "the new output", sweep["previous"]: "the previous output"}
        state = names.get(folder_digest(out), "damaged")
        assert state == "the new output" or (overwrite and state == "the previous output"), (seed, outcome)
    else:
        state = "absent"
        if overwrite:  # killed between the two renames: the previous output waits aside, complete
            assert len(asides) == 1 and folder_digest(asides[0]) == sweep["previous"], (seed, outcome, left)
            state = "absent, previous output aside"
    print(
        f"seed {seed:2d} {mode:10s} overwrite={overwrite!s:5s} {outcome:24s} OUT_DIR {state:19s} "
        f"staging folders left {len(left)}",
        end=" ",
    )

    # The next run: a user re-runs the same command, adding --overwrite if the output now exists.
    again = ["--overwrite"] if overwrite or out.exists() else []
    code = server.run("convert", sweep["config"], out, "--quiet", *again)
    assert code == 0, (server.logs / f"run{server.count}.log").read_text()
    assert folder_digest(out) == sweep["reference"]
    assert staging_folders(parent, name) == [], "the next run left staging folders"
    assert unrelated.read_text() == "keep me"
    assert sorted(p.name for p in parent.iterdir()) == [".out.staging-notes", "out"]
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
    status = server.finished(timeout=120)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    asides = [p for p in staging_folders(parent, "out") if "-old-" in p.name]
    assert len(asides) == 1 and folder_digest(asides[0]) == sweep["previous"]
    if renames == 1:
        assert not out.exists()
        # Re-run without --overwrite: the previous output comes back and is not replaced.
        assert server.run("convert", sweep["config"], out, "--quiet") == 2
        assert "already exists" in (server.logs / f"run{server.count}.log").read_text()
        assert folder_digest(out) == sweep["previous"]
    else:
        assert folder_digest(out) == sweep["reference"]

    assert server.run("convert", sweep["config"], out, "--quiet", "--overwrite") == 0
    assert folder_digest(out) == sweep["reference"]
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
