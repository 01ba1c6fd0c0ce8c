"""Resumable training checkpoints: atomic, marked complete, keep-last-k, correct across ranks.

Layout of OUTPUT/checkpoints/step-00000100/:

| file | holds |
|---|---|
| `model/` | a native checkpoint (config.json + safetensors): loads with `upcycle.load_model` |
| `optimizer.pt` | AdamW state keyed by parameter name (`torch.save`; read with `weights_only=True`) |
| `rng.pt` | each rank's Python, NumPy, torch CPU and CUDA generator states |
| `trainer_state.json` | step, trained tokens and FLOPs, the data sampler's state, the schedule, the config |
| `COMPLETE` | written last; a folder without it is never resumed from |

The folder is written under a staging name and renamed into place (`atomic_output_dir`), so a
kill at any moment leaves the previous checkpoints intact; the marker guards against a folder
copied by hand or a filesystem without atomic rename. The oldest complete checkpoints beyond
`keep_last_k` are deleted only after the new one is in place, and first renamed to a hidden
name, so that a kill while deleting never leaves a half-deleted folder under a checkpoint's
name; hidden leftovers of killed saves and deletions are removed by the next save or resume,
and a resume also prunes what a run killed right after its last save had not yet pruned.

Disk space: before the run (`check_space_for_run`, an estimate: fp32 model bytes plus AdamW's
two fp32 moments) and before each save (the exact tensor bytes about to be written), a
checkpoint that cannot fit in the free space is refused in one sentence; a disk that fills up
during a save anyway (another process writing) is refused the same way, with the partial
checkpoint removed and the earlier ones intact, so the run can be resumed once space is free.

Across ranks (FSDP2): saving gathers the full, unsharded model and optimizer state on rank 0
(`get_model_state_dict` / `get_optimizer_state_dict` with `full_state_dict=True,
cpu_offload=True`), and each rank's RNG states through the process group; only rank 0 touches
the files, then every rank waits at a barrier. Loading is the mirror image: rank 0 reads, and
`set_*_state_dict(..., broadcast_from_rank0=True)` sends every rank its shards. So checkpoints
need no shared filesystem (but resuming must run rank 0 where the files are), and they are
independent of the world size: a run may resume on another number of ranks; only the RNG
streams then restart from the seed, so bitwise equality holds only on the same world size.
Parameter names are those of the plain model: FSDP2 does not rename modules.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from upcycle.checkpoint.atomic import (
    atomic_output_dir,
    atomic_write_bytes,
    pid_alive,
    remove_stale_staging,
    write_refusal,
)
from upcycle.checkpoint.native import write_config
from upcycle.checkpoint.safetensors_io import SafetensorsReader, save_tensors
from upcycle.errors import UpcycleError
from upcycle.model.config import ModelConfig
from upcycle.model.flops import total_parameters
from upcycle.train.distributed import Distributed

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_STEP_FOLDER = re.compile(r"^step-(\d{8})$")
# Hidden leftovers beside the checkpoints: `.step-N.staging-PID-...` (a save) and
# `.step-N.pruned-PID-...` (a deletion), each of a process that may have been killed.
_HIDDEN = re.compile(r"^\.(step-\d{8})\.(staging|pruned)-(\d+)")
# Headers, pickles and JSON beside the tensor bytes; generous for any model.
SLACK_BYTES = 1 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def checkpoint_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    found = []
    if Path(root).is_dir():
        for entry in Path(root).iterdir():
            match = _STEP_FOLDER.match(entry.name)
            if match and (entry / MARKER).is_file():
                found.append((int(match[1]), entry))
    return sorted(found)


def capture_rng() -> dict[str, Any]:
    """This process's generator states, in types `torch.load(weights_only=True)` accepts."""
    kind, key, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, key, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng(seed: int, rank: int) -> None:
    """Distinct, reproducible generator streams per rank (sample_top1 noise, anything random)."""
    derived = (seed * 1_000_003 + rank) % 2**32
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)


def tensor_bytes(state: object) -> int:
    """Bytes of every tensor in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(value) for value in state)
    return 0


def free_bytes(folder: Path) -> tuple[int, Path]:
    """Free bytes on the disk that holds `folder` (or its nearest existing ancestor)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free, existing


def check_space(folder: Path, needed: int, what: str, fix: str) -> None:
    free, existing = free_bytes(folder)
    if needed > free:
        raise UpcycleError(
            f"{what} needs about {needed / 1e6:.1f} MB but only {free / 1e6:.1f} MB are free under "
            f"{existing}; {fix}"
        )


class _RecordingFile:
    """A file whose `write` remembers the OSError it raised: torch.save reports a failed write
    as a RuntimeError, and a full disk must stay recognisable."""

    def __init__(self, handle) -> None:
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(obj: object, path: Path) -> None:
    """`torch.save` through a Python file, so that a full disk raises its OSError."""
    with open(path, "wb") as handle:
        recording = _RecordingFile(handle)
        try:
            torch.save(obj, recording)
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the COMPLETE marker that vouches for it


class Checkpointer:
    """Saves and loads training checkpoints under `root`; every method is called on all ranks."""

    def __init__(
        self, root: Path, keep_last_k: int | None, distributed: Distributed, model_config: ModelConfig
    ) -> None:
        self.root, self.keep_last_k = Path(root), keep_last_k
        self.distributed, self.model_config = distributed, model_config

    def latest(self) -> Path | None:
        """The newest complete checkpoint, as rank 0 sees it (the same answer on every rank)."""
        found = complete_checkpoints(self.root) if self.distributed.is_main else None
        found = self.distributed.broadcast_object(found)
        return found[-1][1] if found else None

    def check_space_for_run(
        self, checkpoints: bool, final_dtype: torch.dtype, trainable_parameters: int | None = None
    ) -> None:
        """Refuse before training when one checkpoint (fp32 model and AdamW's two fp32 moments),
        or with `checkpoints` off the final model, cannot fit on the output's disk."""
        parameters = total_parameters(self.model_config)
        if checkpoints:  # fp32 weights of every parameter, AdamW's two moments of the trainable ones
            trainable = parameters if trainable_parameters is None else trainable_parameters
            needed = parameters * 4 + trainable * 8 + SLACK_BYTES
            what = "a training checkpoint (model and optimizer state)"
        else:
            needed, what = parameters * final_dtype.itemsize + SLACK_BYTES, "the final model"
        fix = "free some space or choose an `output` on a larger disk"
        self._on_main(lambda: check_space(self.root, needed, what, fix))

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        rng_states = self.distributed.gather_objects(capture_rng())
        target = checkpoint_folder(self.root, step)

        def write() -> None:
            self._remove_leftovers()
            needed = tensor_bytes(model_state) + tensor_bytes(optimizer_state) + SLACK_BYTES
            fix = "free some space and rerun with --resume (the earlier checkpoints are intact)"
            check_space(self.root, needed, f"checkpoint {target.name}", fix)
            try:
                self._write(target, step, model_state, optimizer_state, rng_states, state)
            except OSError as error:
                refusal = self._write_refusal(error, target)
                if refusal is None:
                    raise
                raise refusal from error
            self._prune()

        self._on_main(write)
        self.distributed.barrier()
        return target

    def _write(self, target: Path, step: int, model_state, optimizer_state, rng_states, state) -> None:
        with atomic_output_dir(target, overwrite=True) as staging:
            (staging / "model").mkdir()
            save_tensors(staging / "model", model_state)
            write_config(staging / "model", self.model_config)
            _torch_save(optimizer_state, staging / "optimizer.pt")
            _torch_save({"world_size": self.distributed.world_size, "ranks": rng_states}, staging / "rng.pt")
            atomic_write_bytes(staging / TRAINER_STATE, json.dumps(state, indent=1).encode())
            marker = {"step": step, "time": time.time()}
            atomic_write_bytes(staging / MARKER, json.dumps(marker).encode())

    def _write_refusal(self, error: OSError, target: Path) -> UpcycleError | None:
        if error.errno in _NO_SPACE:
            return UpcycleError(
                f"disk full while writing checkpoint {target} ({error.strerror}); the partial checkpoint "
                f"was removed and the earlier ones are intact, free some space under {self.root.parent} "
                "and rerun with --resume"
            )
        return write_refusal(error, target)

    def _on_main(self, action) -> None:
        """Run `action` on rank 0; an UpcycleError it raises is raised on every rank."""
        failure = None
        if self.distributed.is_main:
            try:
                action()
            except UpcycleError as error:
                failure = error
        message = self.distributed.broadcast_object(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise UpcycleError(message)

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model, optimizer and this rank's RNG from `folder`; return the trainer state."""
        main = self.distributed.is_main
        model_state = dict(SafetensorsReader(folder / "model").items()) if main else {}
        optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True) if main else {}
        rng = torch.load(folder / "rng.pt", weights_only=True) if main else None
        state = json.loads((folder / TRAINER_STATE).read_text()) if main else None
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.distributed.active)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        state = self.distributed.broadcast_object(state)
        same_layout = self.distributed.broadcast_object(
            rng is not None and rng["world_size"] == self.distributed.world_size
        )
        if same_layout:
            restore_rng(self.distributed.scatter_objects(rng["ranks"] if main else None))
        else:
            seed_rng(state["config"]["seed"] + state["step"], self.distributed.rank)
        if main:  # finish what a run killed after its last save may have left undone
            self._remove_leftovers()
            self._prune()
        return state

    def _prune(self) -> None:
        if self.keep_last_k is None:
            return
        for _, folder in complete_checkpoints(self.root)[: -self.keep_last_k]:
            hidden = folder.parent / f".{folder.name}.pruned-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.rename(folder, hidden)  # one atomic step out of sight; deleting takes many
            except OSError:  # pruning must never end a run whose checkpoint is already safe
                hidden = folder
            shutil.rmtree(hidden, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Hidden folders of saves and deletions whose process is gone (a killed run)."""
        if not self.root.is_dir():
            return
        for entry in list(self.root.iterdir()):
            match = _HIDDEN.match(entry.name)
            if match is None or pid_alive(int(match[3])):
                continue
            if match[2] == "staging":
                remove_stale_staging(self.root / match[1])
            else:
                shutil.rmtree(entry, ignore_errors=True)
