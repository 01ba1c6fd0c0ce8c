"""The conversion engine's writer thread (`WriteBehind`) and its manners toward the caller:
a writer error reaches the caller, a failing caller does not wait for queued writes it will
discard, views of the tensor in flight are queued without waiting, and a garbage-collector
freeze made by the caller survives a conversion."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from convert_helpers import fp64_source

import upcycle
from upcycle.checkpoint.convert import WriteBehind


class SlowWriter:
    """Records names; each write takes `delay` seconds; optionally fails at one name."""

    def __init__(self, delay: float = 0.0, fail_at: str | None = None) -> None:
        self.delay, self.fail_at, self.written = delay, fail_at, []
        self.threads: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if name == self.fail_at:
            raise OSError(28, "No space left on device")
        self.written.append(name)


def test_writes_happen_in_order_on_the_writer_thread():
    writer = SlowWriter()
    with WriteBehind(writer) as behind:
        for index in range(5):
            behind.write(f"t{index}", torch.zeros(3))
    assert writer.written == [f"t{index}" for index in range(5)]
    assert writer.threads == {"upcycle-writer"}


def test_a_writer_error_reaches_the_caller():
    writer = SlowWriter(fail_at="t1")
    with pytest.raises(OSError, match="No space left"), WriteBehind(writer) as behind:
        for index in range(4):
            behind.write(f"t{index}", torch.zeros(3))
    assert writer.written == ["t0"]  # nothing after the failure


def test_views_of_the_tensor_in_flight_are_queued_without_waiting():
    writer = SlowWriter(delay=0.05)
    stacked = torch.zeros(8, 4)
    with WriteBehind(writer) as behind:
        start = time.perf_counter()
        for row in range(8):
            behind.write(f"row{row}", stacked[row])
        queued_in = time.perf_counter() - start
    assert queued_in < 0.2  # 8 writes of 0.05 s each were not waited for
    assert writer.written == [f"row{row}" for row in range(8)]


def test_a_failing_caller_does_not_wait_for_queued_writes():
    writer = SlowWriter(delay=0.1)
    stacked = torch.zeros(20, 4)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), WriteBehind(writer) as behind:
        for row in range(20):
            behind.write(f"row{row}", stacked[row])
        raise KeyboardInterrupt
    assert time.perf_counter() - start < 1.0  # not 20 x 0.1 s
    assert len(writer.written) < 5


def test_a_freeze_made_by_the_caller_survives_a_conversion(tmp_path):
    source = fp64_source(tmp_path / "dense")
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        upcycle.convert({"recipe": "sparse", "sources": [str(source)], "num_experts": 2}, tmp_path / "out")
        assert frozen > 0 and gc.get_freeze_count() > frozen // 2  # not thawed (a few frozen objects may die)
    finally:
        gc.unfreeze()
