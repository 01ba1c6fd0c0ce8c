"""Training on a disk a few MB large: checkpoints and the final model on a full disk.

The disk is the 8 MiB tmpfs of tests/test_disk_full.py (or, where mounting is refused, its
emulation, extended here to the trainer's own file writes: `torch.save` through a Python file,
the atomic JSON writes and the metrics file). Each test runs on both backends.

What is checked (reliability.md item 13, for training):
- a run whose checkpoint (fp32 model + AdamW's two fp32 moments), or without checkpoints whose
  final model, cannot fit in the free space is refused before anything is written;
- a save that no longer fits when it is due (another process filled the disk since the run
  started) is refused before it writes anything;
- a disk that fills up in the middle of a checkpoint (at the start, the middle or the end of its
  bytes) or of the final model: the CLI exits 2 with one sentence naming the fix (free space,
  rerun with --resume), no partial or hidden checkpoint folder is left, the previous complete
  checkpoint is byte for byte intact, and once space is free `--resume` finishes the run with
  per-step metrics bit-identical to a run that never hit the full disk.
"""

from __future__ import annotations

import builtins
import hashlib
from pathlib import Path

import pytest
import yaml
from cli_helpers import assert_refused, run_cli
from test_disk_full import CAPACITY, QuotaFile, SmallDisk
from test_train_helpers import DENSE, one_thread, prepared_data_fixture, train_config, train_records  # noqa: F401

from upcycle.checkpoint import atomic
from upcycle.train import checkpointing, metrics, trainer

EVERY = 5
STEPS = 10


class TextQuotaFile(QuotaFile):
    """QuotaFile for text handles too (the metrics file)."""

    def write(self, data) -> int:
        if isinstance(data, str):
            self._handle.flush()
            self._disk.reserve(self._handle.name, len(data.encode()))
            return self._handle.write(data)
        return super().write(data)


class TrainDisk(SmallDisk):
    """The small disk, with the emulation also guarding the trainer's own `open` calls."""

    def _emulate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super()._emulate(monkeypatch)
        real_open, disk = builtins.open, self

        def guarded_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return TextQuotaFile(handle, disk) if disk.owns(file) and set(mode) & set("wax+") else handle

        for module in (atomic, checkpointing, metrics):
            monkeypatch.setattr(module, "open", guarded_open, raising=False)


@pytest.fixture(params=["tmpfs", "emulated"])
def disk(request, tmp_path, monkeypatch):
    small = TrainDisk(tmp_path / "disk", request.param, monkeypatch)
    yield small
    small.unmount()


def comparable(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "mfu_datasheet")} for r in records
    ]


def checkpoint_digest(folder: Path) -> str:
    """The bytes of a checkpoint that do not name its run's folder (trainer_state.json does)."""
    digest = hashlib.sha256()
    for name in ("model/model.safetensors", "model/config.json", "optimizer.pt", "rng.pt"):
        digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def write_config(tmp_path: Path, data: Path, output: Path, **overrides) -> Path:
    sections = {
        "stop": {"max_steps": STEPS},
        "checkpoint": {"every_steps": EVERY, "keep_last_k": 2},
        "log": {"tensorboard": False},
    }
    config = train_config(data, output, **{**sections, **overrides})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(prepared_data, tmp_path_factory):
    """The same run on an ordinary disk: its metrics and the checkpoint bytes of step 5."""
    root = tmp_path_factory.mktemp("train_disk_reference")
    config = write_config(root, prepared_data, root / "run")
    result = run_cli("train", config, "--quiet")
    assert result.returncode == 0, result.stderr
    folder = root / "run" / "checkpoints" / f"step-{EVERY:08d}"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {
        "records": comparable(train_records(root / "run")),
        "step5": checkpoint_digest(folder),
        "size": size,
    }


def test_refused_up_front_when_a_checkpoint_cannot_fit(disk, prepared_data, tmp_path):
    """About 1M parameters: 12 MB of checkpoint (model + two moments) on an 8 MiB disk."""
    wide = {**DENSE, "hidden_size": 128, "intermediate_size": 1024}
    config = write_config(tmp_path, prepared_data, disk.path / "run", model={"config": wide})
    result = run_cli("train", config, "--quiet")
    assert_refused(result, "a training checkpoint (model and optimizer state) needs about", "larger disk")
    assert "only" in result.stderr and str(disk.path) in result.stderr
    assert sorted(p.name for p in disk.path.iterdir()) == []

    # Without checkpoints only the final model is written: 4 MB fit, 3.2M parameters do not.
    config = write_config(
        tmp_path, prepared_data, disk.path / "run", model={"config": wide}, checkpoint={"every_steps": 0}
    )
    assert run_cli("train", config, "--quiet").returncode == 0
    huge = {**wide, "intermediate_size": 4096}
    config = write_config(
        tmp_path, prepared_data, disk.path / "huge", model={"config": huge}, checkpoint={"every_steps": 0}
    )
    assert_refused(run_cli("train", config, "--quiet"), "the final model needs about", "free some space")
    assert sorted(p.name for p in disk.path.iterdir()) == ["run"]


@pytest.mark.parametrize(
    "when", ["before_the_save", "at_0pct", "at_50pct", "at_95pct", "final_model"], ids=str
)
def test_disk_fills_up_during_training(disk, prepared_data, reference, tmp_path, monkeypatch, when):
    """The disk fills up while step 10's checkpoint (or the final model) is due; then space is
    freed and the run resumes to the numbers of a run that never hit the full disk."""
    out = disk.path / "run"
    config = write_config(tmp_path, prepared_data, out)
    step10 = f"step-{STEPS:08d}"
    real_check = checkpointing.check_space
    size = reference["size"]

    def fill_then_check(folder, needed, what, fix):
        if what == f"checkpoint {step10}" and when == "before_the_save":
            disk.fill(size // 2)
        real_check(folder, needed, what, fix)
        if what == f"checkpoint {step10}" and when.startswith("at_"):
            disk.fill(int(size * int(when[3:-3]) / 100))

    real_save_native = trainer.save_native

    def fill_then_save_native(*args, **kwargs):
        if when == "final_model":
            disk.fill(0)
        return real_save_native(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "check_space", fill_then_check)
    monkeypatch.setattr(trainer, "save_native", fill_then_save_native)
    result = run_cli("train", config, "--quiet")
    checkpoints = out / "checkpoints"
    print(disk.backend, when, result.stderr.strip())  # for review: pytest -s
    if when == "before_the_save":
        assert_refused(result, f"checkpoint {step10} needs about", "MB are free under", "rerun with --resume")
    elif when == "final_model":
        assert_refused(result, "disk full while writing under", "No space left on device", "--resume")
        assert not (out / "final").exists() and hidden_entries(out) == []
    else:
        assert_refused(
            result, f"disk full while writing checkpoint {checkpoints / step10}", "rerun with --resume"
        )
    complete = [step for step, _ in checkpointing.complete_checkpoints(checkpoints)]
    assert complete == ([EVERY, STEPS] if when == "final_model" else [EVERY])
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step-{s:08d}" for s in complete]
    assert checkpoint_digest(checkpoints / f"step-{EVERY:08d}") == reference["step5"]

    disk.unfill()
    monkeypatch.undo()  # the real writers again (the emulation too: the space is free now)
    resumed = run_cli("train", config, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(train_records(out)) == reference["records"]
    assert (out / "final" / "model.safetensors").is_file()
    assert hidden_entries(checkpoints) == [] and hidden_entries(out) == []
    assert CAPACITY >= disk.free() > 0
