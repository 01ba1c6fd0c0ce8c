"""`upcycle.kernels.trace.trace_constant`: torch's `assume_constant_result` without TorchDynamo's import.

The commands that never compile (convert, inspect, export) must not pay for `import torch._dynamo`
(about 1.2 s on the CI machine), and the mark they set must be exactly torch's, so that compiled
graphs keep the fast-path checks as trace constants (tests/test_compile.py checks the graphs).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
import torch._dynamo.testing

from upcycle.kernels import grouped_moe, router_gemm
from upcycle.kernels.trace import MARK, trace_constant


def _fresh():
    def probe(x: int) -> int:
        return x + 1

    return probe


def test_the_mark_is_what_torchs_decorator_sets():
    import torch._dynamo  # torch's decorator, for comparison

    theirs = torch.compiler.assume_constant_result(_fresh())
    ours = trace_constant(_fresh())
    assert vars(theirs) == vars(ours) == {MARK: True}


def test_fast_path_checks_are_marked():
    for fn in (router_gemm._bf16_tensor_cores, grouped_moe._grouped_mm_available):
        assert getattr(fn, MARK, False) is True, fn.__name__


def test_a_marked_function_is_a_trace_constant():
    calls = []

    @trace_constant
    def flag() -> bool:
        calls.append(1)
        return True

    def f(x):
        return x * 2 if flag() else x

    counts = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(f, backend=counts, fullgraph=True)
    x = torch.ones(3)
    assert torch.equal(compiled(x), x * 2)
    assert counts.frame_count == 1
    assert calls == [1]  # called once, while tracing: its result is a constant of the graph
    compiled(x)
    assert calls == [1]


def test_commands_that_do_not_compile_do_not_import_dynamo():
    code = textwrap.dedent(
        """
        import sys
        import upcycle.cli, upcycle.conversion, upcycle.model, upcycle.kernels.grouped_moe
        import upcycle.kernels.router_gemm, upcycle.checkpoint.export
        print("torch._dynamo" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
