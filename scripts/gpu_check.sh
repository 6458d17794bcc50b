#!/usr/bin/env bash
# On the GPU machine (device tool, repository root, .carry carried): unpacks what
# scripts/gpu_pack.sh built, then runs the CUDA checks and figures, writing logs and
# summary.json under $OUT. Each step runs even when an earlier one fails; the summary says which.
#   STEPS="conformance runtime demo sanitizer bench" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ballast-gpu}
mkdir -p "$OUT"
STEPS=${STEPS:-"info conformance runtime demo bench"}
tar -C .carry -xJf .carry/gpu.tar.xz
BIN=$PWD/.carry/gpu/bin
# cuBLAS 13 from the CUDA toolkit, or from the Python wheel where the toolkit's lib64 lacks it.
CUBLAS=$(dirname "$( (ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null; find / -name 'libcublas.so.13' 2>/dev/null) | head -1)")
export LD_LIBRARY_PATH=$PWD/.carry/gpu/lib:$CUBLAS:${LD_LIBRARY_PATH:-}
export BALLAST_FIXTURES_DIR=$PWD/tests/fixtures
declare -A RESULT

step() {  # step NAME COMMAND...: runs it, logs to $OUT/NAME.log, records its exit code
  local name=$1; shift
  echo "=== $name: $*"
  ( "$@" ) > "$OUT/$name.log" 2>&1
  RESULT[$name]=$?
  tail -n 25 "$OUT/$name.log"
}

for s in $STEPS; do
  case $s in
    info) step info bash -c "nvidia-smi; echo cublas: $CUBLAS; $BIN/ballast generate --device cuda --prompt-ids 1,2,3 --max-new-tokens 4 --model tests/fixtures/qwen3_next_a --json" ;;
    conformance) step conformance "$BIN/test_kernels_cuda" --gtest_brief=1 ;;
    runtime) step runtime env BALLAST_TEST_DEVICE=cuda "$BIN/test_runtime" --gtest_brief=1 \
               --gtest_filter="${RUNTIME_FILTER:-*}" ;;
    demo) step demo bash -c "for d in cpu cuda; do $BIN/ballast generate --device \$d --prompt 'def fibonacci(n):' --max-new-tokens 64 --json; $BIN/ballast generate --device \$d --prompt 'def fibonacci(n):' --max-new-tokens 64 --speculative-algorithm NEXTN --speculative-num-steps 2 --json; done" ;;
    sanitizer) step sanitizer bash -c "compute-sanitizer --tool memcheck $BIN/test_kernels_cuda --gtest_brief=1 && BALLAST_TEST_DEVICE=cuda compute-sanitizer --tool memcheck $BIN/test_runtime --gtest_brief=1 --gtest_filter='Fixtures/FixtureParity.*/qwen3_next_a:Fixtures/ExpertParallel.OutputsEqual*/qwen3_next_a' && compute-sanitizer --tool racecheck $BIN/test_kernels_cuda --gtest_brief=1" ;;
    bench) step bench bash -c "$BIN/ballast bench --device cuda --json --prompt-len 256 --decode-steps 64; $BIN/ballast bench --device cuda --json --synthetic --prompt-len 256 --decode-steps 64; $BIN/ballast bench --device cuda --json --synthetic --prompt-len 256 --decode-steps 64 --batch 32" ;;
  esac
done

{
  echo "{"
  first=1
  for k in "${!RESULT[@]}"; do
    [ $first = 1 ] || echo ","
    printf '  "%s": %s' "$k" "${RESULT[$k]}"
    first=0
  done
  echo; echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
