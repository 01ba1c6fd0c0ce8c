#!/usr/bin/env bash
# Run the GPU-marked tests (`pytest -m gpu`) on a machine with a CUDA GPU, e.g. the device tool's.
# Usage: bash bench/gpu_tests.sh [extra pytest arguments]
# The repository root goes on PYTHONPATH (the GPU machine has no install of upcycle); packages the
# machine lacks (pydantic) must already be importable, e.g. from wheels installed with --target.
# Only the test files that use the gpu marker are collected, so that a module importing something
# the GPU machine lacks cannot stop the GPU tests from running. Exits non-zero when there is no
# GPU (a CPU run must never pass for a GPU one) or when no file uses the marker.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_tests: torch sees no CUDA GPU; these tests need one")
print(f"gpu_tests: {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY
mapfile -t files < <(grep -l 'mark\.gpu' tests/test_*.py)
if [ "${#files[@]}" -eq 0 ]; then
  echo "gpu_tests: no test file uses the gpu marker" >&2
  exit 1
fi
echo "gpu_tests: ${files[*]}"
exec "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider "${files[@]}" "$@"
