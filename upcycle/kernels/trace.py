"""`trace_constant`: torch.compile's `assume_constant_result`, without importing TorchDynamo.

A function so marked is called once while torch.compile traces, and its result becomes a
constant of the graph: no graph break and no guard (the fast-path checks of the MoE layer and the
router use it for facts of the device that cannot change within a process).

`torch.compiler.assume_constant_result` imports `torch._dynamo` (about 1.2 s on a 2-core CPU, more
than `import torch` itself) only to set one attribute that TorchDynamo reads when it meets a call
of the function. The kernels' modules are imported by every `upcycle` command, and most commands
never compile (convert, inspect, export, eval on the CPU): `trace_constant` sets the same attribute
itself.
tests/test_trace_constant.py checks that torch's decorator sets nothing else, so a torch release
that changes it fails the tests instead of silently breaking graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# What torch 2.11–2.13's `torch._dynamo.decorators.assume_constant_result` sets.
MARK = "_dynamo_marked_constant"


def trace_constant(fn: F) -> F:
    """Mark `fn` as torch.compile's `assume_constant_result` does; returns `fn`."""
    setattr(fn, MARK, True)
    return fn
