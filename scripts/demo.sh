#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: `upcycle demo`, the whole workflow (built-in
# corpus -> seed -> four domain branches -> BTX, BAM, sparse upcycling, dense and BTM at equal
# compute -> evaluation -> report) on the CPU. Output in runs/demo unless a folder is given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/upcycle demo --out "${1:-runs/demo}"
