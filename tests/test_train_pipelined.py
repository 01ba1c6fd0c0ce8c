"""Launched steps read later (`upcycle.train.pending`, `TrainStep.launch`): outcomes in launch
order, an earlier step's error first, steps after a run-ending step abandoned; the trainer reads
step s after launching step s + 1, and reads a step before it evaluates or saves after it.

On the CPU every real step is eager (settled when launched), so the trainer's pipelined order is
driven here by a `TrainStep.launch` that runs the real step and defers its reading; the graphed
replays themselves are tested in tests/test_cuda_graph.py (recorded CUDA calls, and on the GPU)."""

from __future__ import annotations

import pytest
import torch
from test_train_helpers import DENSE, one_thread, prepared_data_fixture, train_config, train_records  # noqa: F401

import upcycle.train.trainer as trainer_module
from upcycle.errors import UpcycleError
from upcycle.train import NonFiniteLossError, Trainer, TrainStep
from upcycle.train.config import TrainConfig
from upcycle.train.pending import PendingStep


def _queued(log: list, queue: list, step: int, error: BaseException | None = None) -> PendingStep:
    def read():
        log.append(("read", step))
        if error is not None:
            raise error
        return step

    pending = PendingStep(step, read, queue)
    queue.append(pending)
    return pending


def test_results_are_read_in_launch_order() -> None:
    log, queue = [], []
    first, second, third = (_queued(log, queue, s) for s in (1, 2, 3))
    assert not first.done
    assert third.result() == 3
    assert log == [("read", 1), ("read", 2), ("read", 3)] and queue == []
    assert first.result() == 1 and second.result() == 2 and log[-1] == ("read", 3)  # read once
    settled = PendingStep.settled(4, "four")
    assert settled.done and settled.result() == "four"


def test_an_earlier_error_comes_first_and_abandons_the_later_steps() -> None:
    log, queue = [], []
    stop = NonFiniteLossError("step 1: the loss is nan")
    first, second, third = _queued(log, queue, 1, stop), _queued(log, queue, 2), _queued(log, queue, 3)
    with pytest.raises(NonFiniteLossError, match="step 1"):
        third.result()
    assert log == [("read", 1)] and queue == []  # steps 2 and 3 never read
    with pytest.raises(NonFiniteLossError, match="step 1"):
        first.result()  # the same error again
    for later in (second, third):
        with pytest.raises(UpcycleError, match=f"step {later.step} was launched before step 1 ended the run"):
            later.result()


def test_a_step_read_first_that_fails_abandons_those_after_it() -> None:
    log, queue = [], []
    first = _queued(log, queue, 1, RuntimeError("boom"))
    second = _queued(log, queue, 2)
    with pytest.raises(RuntimeError, match="boom"):
        first.result()
    with pytest.raises(UpcycleError, match="step 2 was launched before step 1"):
        second.result()
    assert log == [("read", 1)]


def _deferred_launch(monkeypatch, log: list, out_of_memory_at: int | None = None) -> None:
    """`TrainStep.launch` as a graphed run behaves: the step's work happens at launch, its values
    are read (and its non-finite decision raised) only when `result()` is called. The deferred
    reads queue apart from `TrainStep.in_flight`, which the real (eager) launch would drain.
    `out_of_memory_at`: that step's launch raises CUDA's out-of-memory error instead."""
    real = TrainStep.launch
    queue: list[PendingStep] = []

    def launch(self, step, micro_batches):
        log.append(("launch", step))
        if step == out_of_memory_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        try:
            done, error = real(self, step, micro_batches), None
        except NonFiniteLossError as raised:  # a graphed step raises it when read
            done, error = None, raised

        def read():
            log.append(("read", step))
            if error is not None:
                raise error
            return done.result()

        pending = PendingStep(step, read, queue)
        queue.append(pending)
        return pending

    monkeypatch.setattr(TrainStep, "launch", launch)


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_reads_a_step_after_launching_the_next(prepared_data, tmp_path, monkeypatch) -> None:
    log: list = []
    _deferred_launch(monkeypatch, log)
    real_save, real_evaluate = trainer_module.Checkpointer.save, Trainer._evaluate

    def save(self, step, *args, **kwargs):
        log.append(("save", step))
        return real_save(self, step, *args, **kwargs)

    def evaluate(self, metrics):
        log.append(("evaluate", self.counters.step))
        return real_evaluate(self, metrics)

    monkeypatch.setattr(trainer_module.Checkpointer, "save", save)
    monkeypatch.setattr(Trainer, "_evaluate", evaluate)
    config = train_config(
        prepared_data, tmp_path / "run", DENSE, stop={"max_steps": 7},
        checkpoint={"every_steps": 3, "keep_last_k": None}, eval={"every_steps": 5, "at_end": False},
    )  # fmt: skip
    Trainer(TrainConfig.model_validate(config), quiet=True).run()
    assert log == [
        ("launch", 1),
        ("launch", 2), ("read", 1),
        ("launch", 3), ("read", 2), ("read", 3), ("save", 3),  # read before the checkpoint
        ("launch", 4),
        ("launch", 5), ("read", 4), ("read", 5), ("evaluate", 5),  # and before an evaluation
        ("launch", 6), ("read", 6), ("save", 6),
        ("launch", 7), ("read", 7), ("save", 7),  # the last step: read, then saved
    ]  # fmt: skip
    assert [r["step"] for r in train_records(tmp_path / "run")] == list(range(1, 8))


@pytest.mark.usefixtures("one_thread")
def test_a_nonfinite_step_read_late_still_stops_the_run(prepared_data, tmp_path, monkeypatch) -> None:
    """Step 3's non-finite loss is raised when step 3 is read (after step 4 was launched), with
    step 3 named; the metrics hold steps 1 and 2 only."""
    from test_train_faults import inject

    log: list = []
    _deferred_launch(monkeypatch, log)
    inject(monkeypatch, "nan", at_steps=(3,))
    config = train_config(prepared_data, tmp_path / "run", DENSE, stop={"max_steps": 6})
    with pytest.raises(NonFiniteLossError, match="step 3"):
        Trainer(TrainConfig.model_validate(config), quiet=True).run()
    assert log[-2:] == [("launch", 4), ("read", 3)]  # raised by the read, after step 4's launch
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 2]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("step_3", ["finite", "nan"])
def test_a_failing_launch_reads_the_step_before_it_first(
    prepared_data, tmp_path, monkeypatch, step_3
) -> None:
    """Step 4's launch runs out of memory while step 3 is unread: step 3 is read first, so it is
    logged and counted (the advice names step 4), or, non-finite, its own error is raised."""
    from test_train_faults import inject

    log: list = []
    _deferred_launch(monkeypatch, log, out_of_memory_at=4)
    if step_3 == "nan":
        inject(monkeypatch, "nan", at_steps=(3,))
    config = train_config(prepared_data, tmp_path / "run", DENSE, stop={"max_steps": 6})
    trainer = Trainer(TrainConfig.model_validate(config), quiet=True)
    expected = (UpcycleError, "at step 4") if step_3 == "finite" else (NonFiniteLossError, "step 3")
    with pytest.raises(expected[0], match=expected[1]):
        trainer.run()
    assert log[-2:] == [("launch", 4), ("read", 3)]
    logged = [r["step"] for r in train_records(tmp_path / "run")]
    assert logged == ([1, 2, 3] if step_3 == "finite" else [1, 2])
