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
`keep_last_k` are deleted only after the new one is in place.

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

import json
import random
import re
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

from upcycle.checkpoint.atomic import atomic_output_dir, atomic_write_bytes
from upcycle.checkpoint.native import write_config
from upcycle.checkpoint.safetensors_io import SafetensorsReader, save_tensors
from upcycle.model.config import ModelConfig
from upcycle.train.distributed import Distributed

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_STEP_FOLDER = re.compile(r"^step-(\d{8})$")


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

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        rng_states = self.distributed.gather_objects(capture_rng())
        target = checkpoint_folder(self.root, step)
        if self.distributed.is_main:
            with atomic_output_dir(target, overwrite=True) as staging:
                (staging / "model").mkdir()
                save_tensors(staging / "model", model_state)
                write_config(staging / "model", self.model_config)
                torch.save(optimizer_state, staging / "optimizer.pt")
                torch.save(
                    {"world_size": self.distributed.world_size, "ranks": rng_states}, staging / "rng.pt"
                )
                atomic_write_bytes(staging / TRAINER_STATE, json.dumps(state, indent=1).encode())
                marker = {"step": step, "time": time.time()}
                atomic_write_bytes(staging / MARKER, json.dumps(marker).encode())
            self._prune()
        self.distributed.barrier()
        return target

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
        return state

    def _prune(self) -> None:
        if self.keep_last_k is None:
            return
        for _, folder in complete_checkpoints(self.root)[: -self.keep_last_k]:
            shutil.rmtree(folder, ignore_errors=True)
