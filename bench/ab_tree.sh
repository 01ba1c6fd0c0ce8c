#!/usr/bin/env bash
# The code of an older commit in out/ab/ (git ignores out/), for `bash bench/speed_gpu.sh ab`:
# the device tool carries it with `carry: ["out/ab"]` and the graphed step runs from both trees
# on one card. Usage: bash bench/ab_tree.sh <commit>
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: bash bench/ab_tree.sh <commit>" >&2; exit 2; }
git rev-parse --verify --quiet "$1^{commit}" > /dev/null || { echo "ab_tree: $1 is not a commit here" >&2; exit 2; }
rm -rf out/ab.tmp && mkdir -p out/ab.tmp
git archive "$1" upcycle bench | tar -x -C out/ab.tmp
rm -rf out/ab && mv out/ab.tmp out/ab
echo "out/ab: $(git rev-parse --short "$1") ($(du -sh out/ab | cut -f1))"
