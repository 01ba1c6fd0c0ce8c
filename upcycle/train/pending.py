"""`PendingStep`: a training step that has been launched, whose values the host reads later.

A graphed step (`upcycle.train.cuda_graph`) is queued on the GPU in microseconds; reading its
loss and gradient norm means waiting for the GPU to finish it. `TrainStep.launch` returns the
step as a `PendingStep` without waiting, so a training loop can queue step s + 1 before it reads
step s (`upcycle.train.trainer`): the GPU then never idles while the host logs, fetches the next
batch and launches the next graph. `TrainStep.__call__` is `launch(...).result()`, the
one-step-at-a-time order.

Outcomes are read in launch order: `result()` of a step first settles every step launched before
it, and an error of an earlier step is raised before a later step's result. A step whose
reading fails marks the steps launched after it as abandoned: their `result()` raises instead
of returning values. After a non-finite step under the stop policy their updates were also
skipped on the device (`TrainStep.device_step`'s `halted` flag), so the weights are those from
before the failing step.
"""

from __future__ import annotations

from collections.abc import Callable

from upcycle.errors import UpcycleError


class PendingStep:
    """One launched step. `read` produces its `StepResult` (waiting for the GPU) or raises;
    `queue` is the owner's list of steps in flight, in launch order (None: already settled)."""

    def __init__(self, step: int, read: Callable[[], object], queue: list[PendingStep] | None) -> None:
        self.step = step
        self._read: Callable[[], object] | None = read
        self._queue = queue
        self._value: object = None
        self._error: BaseException | None = None

    @classmethod
    def settled(cls, step: int, result: object) -> PendingStep:
        """A step whose result is already on the host (an eager step)."""
        pending = cls(step, lambda: result, None)
        pending._settle()
        return pending

    @property
    def done(self) -> bool:
        """Whether the outcome is on the host (no wait left)."""
        return self._read is None

    def result(self):
        """The step's `StepResult`, waiting for the GPU if needed; raises what the step raised
        (and, first, what an earlier step in flight raised)."""
        queue = self._queue
        while queue and not self.done:
            earlier = queue.pop(0)
            earlier._settle()  # a failure abandons every step still queued, this one included
            if earlier._error is not None and earlier is not self:
                raise earlier._error
        if self._error is not None:
            raise self._error
        return self._value

    def _settle(self) -> None:
        if self._read is None:
            return
        read, self._read = self._read, None
        try:
            self._value = read()
        except BaseException as error:  # kept: raised again by every result() call
            self._error = error
            if self._queue:
                for later in self._queue:
                    later._abandon(self.step)
                self._queue.clear()

    def _abandon(self, stopped_at: int) -> None:
        self._read = None
        self._error = UpcycleError(
            f"step {self.step} was launched before step {stopped_at} ended the run with an error, so "
            "it has no result; resume from the last checkpoint"
        )
