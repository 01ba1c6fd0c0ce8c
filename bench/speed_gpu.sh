#!/usr/bin/env bash
# The speed issue's GPU session in one command (device tool): GPU tests, profiles, layer, attention
# and whole-step benchmarks; every output lands in $OUT (default runs/speed).
#
# Usage: bash bench/speed_gpu.sh [parts...]
#   parts: tests gemm gather profile layer attention step tuned quick bf16w ab router
#   (default: all but tuned, quick, bf16w, ab and router)
#
# `ab` times the graphed Mixtral step of this tree and of an older one on the same card in one
# call, new / old / new (one file, step.txt): make the older tree here first with
# `bash bench/ab_tree.sh <commit>` (a `git archive` into out/ab/, which git ignores) and pass
# `carry: ["out/ab", ...]` to the device tool; AB_COMMIT names it in the tables.
#
# `quick` is the issue's headline figures in one device call (about 8 minutes, eight files: leave
# no other file under $OUT, the device tool returns about eight): the Mixtral step (bf16-weights
# compiled with and without `--cuda-graph`, graphed with the dispatched rows kept, transformers bf16 eager), where the launched step waits for the host (bench/host_lag.py), both attention
# variants, the S1, S2 and S3 layers with their CUDA-graph rows, every GPU test, the AdamW step
# alone (torch's fused kernel against upcycle's) and the graphed bf16-weights step's profile.
# `router` times the fp32 router's kernels alone (bench/router_kernels.py: launch-shape variants,
# the bf16 parts, the upcast GEMM) at the Mixtral step's router and the attention experts'.
# `bf16w` diagnoses the compiled bf16-weights step that run G measured host-bound
# (bench/RESULTS.md, fifth round): graph breaks and recompiles, the step with the router operator
# switched off, the corrected idle table and the host's Python functions (gpu_profile.py --host)
# of the bf16-weights and fp32-master steps.
#
# Each part runs under its own time limit so one slow part cannot stop the rest. The device tool's
# copy of .git can be stale: pass the commit being measured as UPCYCLE_COMMIT=<hash> so that every
# table names it (bench/benchlib.py). LAYER_ARGS / GATHER_ARGS add arguments to the layer and
# gather benches (e.g. GATHER_ARGS="--shapes S2"); STEP_CASES picks the step part's cases,
# ';'-separated (default: ours and transformers, each eager and compiled).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/speed}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
parts=("$@")
[ "${#parts[@]}" -eq 0 ] && parts=(tests gemm gather profile layer attention step)
has() { [[ " ${parts[*]} " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if has tests; then
  timeout 240 bash bench/gpu_tests.sh > "$OUT/gpu_tests.txt" 2>&1; tail -3 "$OUT/gpu_tests.txt"
fi
if has gemm; then
  timeout 90 python3 bench/grouped_gemm.py --no-autotune --json "$OUT/gemm.json" > "$OUT/gemm.txt" 2>&1
  tail -20 "$OUT/gemm.txt"
fi
if has gather; then
  timeout 240 python3 bench/gather_gemm.py ${GATHER_ARGS:-} --json "$OUT/gather.json" > "$OUT/gather.txt" 2>&1
  tail -50 "$OUT/gather.txt"
fi
if has profile; then
  for c in "moe S2" "dense S2" "moe S3 --compile" "dense S3" "attention dense" "attention expert-KV" "attention shared-KV" \
    "step mixtral --compile"; do
    timeout 100 python3 bench/gpu_profile.py $c --top 30 >> "$OUT/profile.md" 2>> "$OUT/profile_err.txt"
  done
  grep -A12 "^## " "$OUT/profile.md" | grep -v "^|---"
fi
if has layer; then
  tiles=()  # the gathered GEMMs' launch configuration: the gather part's best, if it ran
  best=$(python3 bench/best_tiles.py "$OUT/gather.json" 2>> "$OUT/moe_layer.txt") && tiles=(--gather-tiles "$best")
  timeout 300 python3 bench/moe_layer.py ${LAYER_ARGS:-} "${tiles[@]}" --json "$OUT/moe_layer.json" >> "$OUT/moe_layer.txt" 2>&1
  grep -A40 "^| shape | implementation" "$OUT/moe_layer.txt" | head -60
fi
if has attention; then
  timeout 150 python3 bench/attention_experts.py --no-cudnn --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
  tail -22 "$OUT/attention.txt"
fi
# The Mixtral-shaped step, one case per process, a table row each in step.txt (and a JSON file
# each with a third argument `json`): run_steps LIMIT_S "case args;case args;..." [json]
run_steps() {
  local limit="$1" cases c json
  IFS=';' read -r -a cases <<< "$2"
  for c in "${cases[@]}"; do
    json=()
    [ "${3:-}" = json ] && json=(--json "$OUT/step_$(echo $c | tr -d ' -').json")
    timeout "$limit" python3 bench/train_step.py --batch 8 --seq-len 2048 --steps 10 --cases $c \
      "${json[@]}" 2>&1 | tail -1 >> "$OUT/step.txt"
  done
  cat "$OUT/step.txt"
}
if has step; then
  run_steps 150 "${STEP_CASES:-mixtral --compile;mixtral;hf-mixtral-bf16;hf-mixtral-bf16 --compile}" json
fi
if has quick; then
  run_steps 110 "mixtral-bf16w --compile --cuda-graph;mixtral-bf16w --compile --cuda-graph --keep-rows;mixtral-bf16w --compile;hf-mixtral-bf16"
  timeout 90 python3 bench/host_lag.py --compile > "$OUT/host_lag.md" 2>&1; grep -E "^\| (backward|optimizer)" "$OUT/host_lag.md" | head -12
  timeout 100 python3 bench/attention_experts.py --no-cudnn > "$OUT/attention.txt" 2>&1; tail -12 "$OUT/attention.txt"
  timeout 150 python3 bench/moe_layer.py --shapes S1 S2 S3 --no-compile > "$OUT/moe_layer.txt" 2>&1
  grep -A40 "^| shape | implementation" "$OUT/moe_layer.txt" | head -40
  timeout 240 bash bench/gpu_tests.sh > "$OUT/gpu_tests.txt" 2>&1; tail -2 "$OUT/gpu_tests.txt"
  timeout 60 python3 bench/optimizer_step.py > "$OUT/optimizer.txt" 2>&1; tail -4 "$OUT/optimizer.txt"
  timeout 90 python3 bench/gpu_profile.py step mixtral-bf16w --compile --cuda-graph --top 60 > "$OUT/profile.md" 2>&1
  grep -B2 -A14 "idle" "$OUT/profile.md" | head -40
fi
if has bf16w; then
  TORCH_LOGS="graph_breaks,recompiles" timeout 110 python3 bench/train_step.py --batch 8 --seq-len 2048 --steps 10 \
    --cases mixtral-bf16w --compile > "$OUT/bf16w_logs.txt" 2>&1
  echo "graph breaks / recompiles: $(grep -c 'Graph break\|Recompiling' "$OUT/bf16w_logs.txt")"
  grep -m6 "Graph break in user code\|Recompiling\|limit" "$OUT/bf16w_logs.txt" | cut -c1-300
  tail -1 "$OUT/bf16w_logs.txt" | tee "$OUT/bf16w_step.txt"
  timeout 110 python3 -c "import runpy, sys; import upcycle.kernels.router_gemm as r
r.applies = lambda x, w: False
sys.argv = ['train_step.py', '--batch', '8', '--seq-len', '2048', '--steps', '10', '--cases', 'mixtral-bf16w', '--compile']
runpy.run_path('bench/train_step.py', run_name='__main__')" 2>&1 | tail -1 | sed 's/mixtral-bf16w/mixtral-bf16w, fp32 router GEMM/' | tee -a "$OUT/bf16w_step.txt"
  # the host's side of both compiled steps (cProfile), bf16 weights against fp32 masters
  for c in mixtral-bf16w mixtral; do
    timeout 110 python3 bench/gpu_profile.py step $c --compile --top 30 --host >> "$OUT/bf16w_profile.md" 2>&1
  done
  grep -A14 "GPU idle\|^Host under" "$OUT/bf16w_profile.md" | cut -c1-200
fi
if has router; then
  timeout 150 python3 bench/router_kernels.py --json "$OUT/router.json" > "$OUT/router.txt" 2>&1
  timeout 150 python3 bench/router_kernels.py --tokens 8192 --dim 4096 --experts 4 >> "$OUT/router.txt" 2>&1
  grep -E "^(T |\| (logits|dx|dw|router))" "$OUT/router.txt"
fi
if has tuned; then
  timeout 150 python3 bench/grouped_gemm.py --shapes S2 --json "$OUT/gemm_tuned.json" > "$OUT/gemm_tuned.txt" 2>&1
  tail -8 "$OUT/gemm_tuned.txt"
fi
if has ab; then
  [ -d out/ab/upcycle ] || { echo "ab: no out/ab/upcycle; run bash bench/ab_tree.sh <commit> first" >&2; exit 2; }
  S="--batch 8 --seq-len 2048 --steps 10 --cases mixtral-bf16w --compile --cuda-graph"
  for side in new old new; do
    if [ "$side" = old ]; then
      (cd out/ab && UPCYCLE_COMMIT="${AB_COMMIT:-old}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
        timeout 100 python3 bench/train_step.py $S 2>&1 | tail -1 | sed "s/^/old /") >> "$OUT/step.txt"
    else
      timeout 100 python3 bench/train_step.py $S 2>&1 | tail -1 | sed "s/^/new /" >> "$OUT/step.txt"
    fi
  done
  cat "$OUT/step.txt"
fi
