"""Running code under Triton's CPU interpreter, for the tests of the Triton kernels (no tests here).

`run_interpreted(code)` runs `code` in a fresh Python with TRITON_INTERPRET=1 (it must be set
before Triton is imported) and the repository and tests/ on the path, and returns its standard output; a
failure fails the calling test with the child's traceback.

Triton 3.6's interpreter turns integer scalars into one-element arrays and calls int() on them,
which NumPy >= 2.3 refuses ("only 0-dimensional arrays can be converted to Python scalars"):
loops with run-time bounds then fail in the interpreter only. The child process patches that
conversion first; compiled kernels are not affected.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INTERPRETER_SHIM = textwrap.dedent(
    """
    import numpy as np
    import triton.runtime.interpreter as interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_with_scalar_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_with_scalar_index
    """
)


def run_interpreted(code: str, timeout: float = 600) -> str:
    # the repository and tests/ (test modules that the child imports import their helpers)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SHIM + code],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
