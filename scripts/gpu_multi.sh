#!/usr/bin/env bash
# On a GPU machine with several GPUs (device tool kinds nvidia-h200-x2 / -x4 / -x8; .carry/gpu.tar.xz
# carried): issue 19's multi-GPU runs in one call, logs under $OUT.
#   1. the NCCL data plane's conformance at every rank count up to the GPUs, and its latency and
#      bandwidth (bench_dist nccl);
#   2. greedy outputs of MPI ranks (one GPU each, rows over NCCL) against one GPU: G = 2 and 4 (as the
#      GPUs allow), static / random / balanced dispatch, rebalancing every 3 passes, and NEXTN;
#   3. the scaling table: the 80B shape (synthetic FP8 weights, MULTI_LAYERS layers, default 48) at
#      G = 1, 2, 4, 8 (as the GPUs allow), decode and prefill, with rebalancing, as JSON (per-pass
#      balancedness and each rebalance's bytes and time under expert_parallel).
#   bash scripts/gpu_multi.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ballast-multi}
mkdir -p "$OUT"
. scripts/gpu_env.sh
GPUS=$(nvidia-smi -L | wc -l)
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x LD_LIBRARY_PATH)
echo "GPUs: $GPUS" | tee "$OUT/multi.log"

{
  echo "=== 1. conformance and bandwidth"
  "$BIN/test_dist_nccl" --gtest_brief=1
  "$BIN/bench_dist" nccl
} >> "$OUT/multi.log" 2>&1

# 2. Greedy equality on the shipped default model (32 experts, an MTP head): every prompt's tokens
# under G MPI ranks equal one GPU's.
PROMPTS=$(mktemp)
printf '%s\n' "1,2,3,4,5" "100,200,300" "7,7,7,7,7,7,7,7" "42" "5,10,15,20,25,30" "999,1,998,2" "11,22,33" \
  "64,65,66,67,68,69,70" > "$PROMPTS"
gen() {  # gen RANKS ARGS...: every prompt's output tokens (rank 0's JSON)
  local g=$1; shift
  local cmd=("$BIN/ballast" generate --device cuda --prompts-file "$PROMPTS" --max-new-tokens 24 --json "$@")
  if [ "$g" = 1 ]; then "${cmd[@]}"; else "${MPIRUN[@]}" -np "$g" "${cmd[@]}"; fi 2>>"$OUT/multi.log" |
    python3 -c 'import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["output_ids"])'
}
{
  echo "=== 2. greedy outputs, G GPUs against one"
  for spec in "" "--speculative-algorithm NEXTN --speculative-num-steps 2 --speculative-eagle-topk 1 --speculative-num-draft-tokens 3"; do
    # shellcheck disable=SC2086
    want=$(gen 1 $spec)
    for g in 2 4; do
      [ "$g" -le "$GPUS" ] || continue
      for d in static random balanced; do
        # shellcheck disable=SC2086
        got=$(gen "$g" --ep-num-redundant-experts "$g" --enable-eplb --eplb-rebalance-num-iterations 3 \
              --eplb-rebalance-layers-per-chunk 1 --ep-dispatch-algorithm "$d" $spec)
        if [ -n "$want" ] && [ "$got" = "$want" ]; then r=equal; else r=DIFFERENT; fi
        echo "G=$g dispatch=$d ${spec:+NEXTN }: $r"
      done
    done
  done
} >> "$OUT/multi.log" 2>&1
rm -f "$PROMPTS"

# 3. Scaling: decode and prefill of the 80B shape at each G, rebalancing every 8 passes.
{
  echo "=== 3. scaling"
  for g in 1 2 4 8; do
    [ "$g" -le "$GPUS" ] || continue
    args=(bench --device cuda --synthetic qwen3-next-80b-a3b --dtype fp8 --layers "${MULTI_LAYERS:-48}"
          --batch 1,8,32,128 --prompt-len 1024 --decode-steps 32 --prefill 8192 --repeats 1
          --json-file "$OUT/scale-g$g.json")
    [ "$g" -gt 1 ] && args+=(--ep-num-redundant-experts "$g" --enable-eplb --eplb-rebalance-num-iterations 8)
    echo "--- G=$g"
    if [ "$g" = 1 ]; then "$BIN/ballast" "${args[@]}"; else "${MPIRUN[@]}" -np "$g" "$BIN/ballast" "${args[@]}"; fi
  done
} >> "$OUT/multi.log" 2>&1
grep -E "^(===|---|G=|nccl G|\[  (PASSED|FAILED))|tok/s|rebalanc" "$OUT/multi.log" | head -80
