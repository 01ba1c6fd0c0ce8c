"""Shared pieces of the SIGKILL sweeps of `upcycle convert`, `upcycle data prepare`, `upcycle train`
and `upcycle run` (tests/test_*kill_sweep.py; this module holds no tests).

`ForkServer` runs CLI invocations as forked children of one Python process that has already
imported upcycle and torch (on one thread, so that every run computes the same bits), so a run
costs its work, not an interpreter start. Each child executes `upcycle.cli.main(argv)` and is
killed with SIGKILL, either by the test (`kill_after`: at a random time) or by itself at a point
chosen by the request, which a test could not hit reliably from outside:

- `die_after_renames: n`: right after the n-th `os.rename` (a folder moved into place, an old
  checkpoint moved aside for deletion); each rename is also logged, so a run with a large `n`
  counts them;
- `die_at_bytes: {marker, bytes, modules}`: once `bytes` bytes have been written to files whose
  path contains `marker` (e.g. the staging folder of one checkpoint), after writing exactly that
  many, through `open` in each named module and `Path.write_text` / `write_bytes`;
- `die_in_rmtree: marker`: in the middle of deleting a folder whose path contains `marker`
  (half of its files gone).

`UPCYCLE_KILL_SEEDS` sets the number of seeds of every sweep (each file has a small default;
issue 9 asks for 20: `UPCYCLE_KILL_SEEDS=20 pytest tests/test_*kill_sweep.py`).
"""

from __future__ import annotations

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
from collections.abc import Callable
from pathlib import Path

import yaml

FORK_SERVER = r"""
import builtins, fcntl, importlib, json, os, pathlib, shutil, sys, traceback
import torch
import upcycle
from upcycle.checkpoint.safetensors_io import DIRECT_ALIGN
from upcycle.cli import main

import upcycle.data, upcycle.eval, upcycle.pipeline.run, upcycle.train  # what the commands import
import matplotlib

matplotlib.use("Agg")  # as upcycle.eval.plots does, for the report and routing figures
import matplotlib.pyplot

torch.set_num_threads(1)
with torch.device("meta"):  # imports what a first run would (torch._dynamo), computing nothing
    torch.nn.Embedding(2, 2)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def die():
    sys.stderr.flush()
    os.kill(os.getpid(), 9)


def die_after_renames(count):
    real_rename, done = os.rename, []

    def rename(*args, **kwargs):
        real_rename(*args, **kwargs)
        done.append(args)
        print(f"rename {len(done)}: {os.fsdecode(args[1])}", file=sys.stderr, flush=True)
        if len(done) == count:
            die()

    os.rename = rename


def die_at_bytes(marker, limit, modules):
    written = [0]

    def take(size):
        # How many of `size` bytes may be written before the limit (less than `size`: die after).
        room = limit - written[0]
        if size < room:
            written[0] += size
            return size
        written[0] = limit
        return max(room, 0)

    class Counting:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            if isinstance(data, str):
                raw = data.encode()
                allowed = take(len(raw))
                if allowed < len(raw):
                    self._handle.write(raw[:allowed].decode(errors="ignore"))
                    self._handle.flush()
                    die()
                return self._handle.write(data)
            view = memoryview(data).cast("B")
            allowed = take(len(view))
            if allowed < len(view):
                if fcntl.fcntl(self._handle.fileno(), fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
                    allowed -= allowed % DIRECT_ALIGN  # a direct write takes whole blocks, as a kernel's
                self._handle.write(view[:allowed])
                self._handle.flush()
                die()
            return self._handle.write(data)

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        watched = isinstance(file, (str, bytes, os.PathLike)) and marker in os.fsdecode(file)
        return Counting(handle) if watched and set(mode) & set("wax+") else handle

    for name in modules:
        setattr(importlib.import_module(name), "open", counting_open)
    real_write_bytes, real_write_text = pathlib.Path.write_bytes, pathlib.Path.write_text

    def write_bytes(path, data):
        if marker in str(path):
            allowed = take(len(data))
            if allowed < len(data):
                real_write_bytes(path, bytes(data[:allowed]))
                die()
        return real_write_bytes(path, data)

    def write_text(path, data, *args, **kwargs):
        if marker in str(path):
            raw = data.encode()
            allowed = take(len(raw))
            if allowed < len(raw):
                real_write_bytes(path, raw[:allowed])
                die()
        return real_write_text(path, data, *args, **kwargs)

    pathlib.Path.write_bytes, pathlib.Path.write_text = write_bytes, write_text


def die_in_rmtree(marker):
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if marker in os.fsdecode(path):
            files = sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())
            for file in files[: len(files) // 2]:
                file.unlink()
            die()
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree


for line in iter(sys.stdin.readline, ""):
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(log, 2)
        if request.get("die_after_renames"):
            die_after_renames(request["die_after_renames"])
        if request.get("die_at_bytes"):
            spec = request["die_at_bytes"]
            die_at_bytes(spec["marker"], spec["bytes"], spec["modules"])
        if request.get("die_in_rmtree"):
            die_in_rmtree(request["die_in_rmtree"])
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

SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def seeds(default: int) -> int:
    return int(os.environ.get("UPCYCLE_KILL_SEEDS", str(default)))


class ForkServer:
    """Runs `upcycle` CLI invocations as forked children of one pre-imported interpreter."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **SUBPROCESS_ENV, "HF_HUB_OFFLINE": "1"},
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.count = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def start(self, *argv: object, **hooks: object) -> int:
        """Fork a child running `upcycle ARGV` with the given hooks; its pid."""
        self.count += 1
        request = {"argv": [str(a) for a in argv], "log": str(self.log()), **hooks}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.lines.get(timeout=120)["pid"]

    def log(self) -> Path:
        """The stderr of the latest run."""
        return self.logs / f"run{self.count}.log"

    def finished(self, timeout: float | None = None) -> int | None:
        """The wait status of the running child, or None if it still runs after `timeout`."""
        try:
            return self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout: float = 600) -> int:
        message = self.finished(timeout=timeout)
        assert message is not None, f"a run did not end in {timeout} s"
        return message["status"]

    def run(self, *argv: object, **hooks: object) -> int:
        """Run to the end; the exit code (negative: killed by that signal)."""
        self.start(*argv, **hooks)
        return os.waitstatus_to_exitcode(self.wait())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # no need to wait for torch's interpreter shutdown
        self.proc.wait(timeout=60)


def kill_after(server: ForkServer, pid: int, delay: float) -> tuple[str, int]:
    """SIGKILL `delay` seconds after the start, unless the run ends first: (outcome, wait status)."""
    message = server.finished(timeout=delay) if delay > 0 else None
    if message is not None:
        return "finished first", message["status"]
    os.kill(pid, signal.SIGKILL)
    return f"killed after {delay:.2f} s", server.wait(120)


def was_killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def tree_digest(folder: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over every file under `folder` (relative name and bytes), except names in `skip`."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name not in skip:
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def hidden_leftovers(folder: Path) -> list[str]:
    """Staging folders, aside copies, pruned checkpoints and temporary files anywhere below `folder`."""
    marks = (".staging-", ".pruned-", ".tmp-")
    return sorted(
        str(p.relative_to(folder)) for p in Path(folder).rglob(".*") if any(m in p.name for m in marks)
    )


def seed_run(sweep: dict, seed: int, modes: tuple[str, ...], config: Callable[[Path], dict]):
    """A seed of a sweep whose command is run again in place after the kill: its random numbers,
    its kill mode, its output folder `seed<N>` under the sweep's root and its config file there,
    written with `config(output folder)`: (rng, mode, out, config path)."""
    out, path = sweep["root"] / f"seed{seed}", sweep["root"] / f"seed{seed}.yaml"
    path.write_text(yaml.safe_dump(config(out)))
    return random.Random(seed), modes[seed % len(modes)], out, path


class OutputSeed:
    """One seed of a sweep over a command that writes one output folder, `seed<N>/out` under the
    sweep's root, beside a file named like a staging folder (`.out.staging-notes`, which must
    survive): its random numbers `rng`, its kill `mode`, and whether it replaces the previous
    output (`overwrite`, odd seeds: a copy of `sweep["previous_dir"]` is put in place first). The
    sweep holds the tree_digest of the new output (`reference`) and of the previous (`previous`)."""

    def __init__(self, sweep: dict, seed: int, modes: tuple[str, ...]) -> None:
        self.sweep, self.rng, self.mode = sweep, random.Random(seed), modes[seed % len(modes)]
        self.overwrite = seed % 2 == 1
        parent = sweep["root"] / f"seed{seed}"
        parent.mkdir()
        self.out = parent / "out"
        (parent / ".out.staging-notes").write_text("keep me")
        if self.overwrite:
            shutil.copytree(sweep["previous_dir"], self.out)

    def state_after_kill(self, context: object) -> str:
        """After the kill, the output is the new one, or still the previous one it was replacing,
        or absent; absent while replacing, the previous output waits complete in its one `-old-`
        staging folder (killed between the two renames). The state in words; `context` goes into
        the assertions."""
        out, sweep = self.out, self.sweep
        if out.exists():
            names = {sweep["reference"]: "the new output", sweep["previous"]: "the previous output"}
            state = names.get(tree_digest(out), "damaged")
            assert state == "the new output" or (self.overwrite and state == "the previous output"), context
            return state
        if not self.overwrite:
            return "absent"
        asides = sorted(out.parent.glob(f".{out.name}.staging-*-old-*"))
        assert len(asides) == 1 and tree_digest(asides[0]) == sweep["previous"], (context, asides)
        return "absent, previous output aside"

    def check_next_run(self) -> None:
        """After the next run: the output holds the new bytes and nothing is left beside it but
        the file named like a staging folder, unchanged."""
        assert tree_digest(self.out) == self.sweep["reference"]
        assert (self.out.parent / ".out.staging-notes").read_text() == "keep me"
        assert sorted(p.name for p in self.out.parent.iterdir()) == [".out.staging-notes", "out"]
