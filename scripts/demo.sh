#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: create a tiny Llama-shaped model from
# examples/tiny-model.yaml and inspect it. (The full Branch -> Train -> Mix demo replaces this
# when `upcycle demo` lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/tiny-model}
.venv/bin/upcycle init examples/tiny-model.yaml "$out" --overwrite
.venv/bin/upcycle inspect "$out"
