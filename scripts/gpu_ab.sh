#!/usr/bin/env bash
# On the GPU machine: two builds of ballast side by side in one run, alternated ROUNDS times (the
# same machine and the same hour: machines differ by 5-20%, so compare only within one run).
# Pack here: .carry/ab.tar.xz holding gpu/bin/ballast (this build), gpu/bin/ballast-old (the build
# to compare with) and gpu/lib (as scripts/gpu_pack.sh collects it), e.g. after gpu_pack.sh:
#   tar -C /tmp/ab -xJf .carry/gpu.tar.xz && rm /tmp/ab/gpu/bin/test_* && cp OLD /tmp/ab/gpu/bin/ballast-old
#   tar -C /tmp/ab -cJf .carry/ab.tar.xz gpu        # then carry .carry/ab.tar.xz
# AB_ARGS: the bench arguments (default: the 80B shape in FP8 at full depth).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ballast-ab}
mkdir -p "$OUT"
tar -C .carry -xJf .carry/ab.tar.xz
CUBLAS=$(dirname "$( (ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null; find / -name 'libcublas.so.13' 2>/dev/null) | head -1)")
export LD_LIBRARY_PATH=$PWD/.carry/gpu/lib:$CUBLAS:${LD_LIBRARY_PATH:-}
ARGS=${AB_ARGS:-"--synthetic qwen3-next-80b-a3b --dtype fp8 --layers 48 --batch 1,8,32,128 --prompt-len 1024 --decode-steps 32 --prefill 1024 --repeats 1"}
for r in $(seq 1 "${ROUNDS:-2}"); do
  for v in ballast-old ballast; do
    # shellcheck disable=SC2086
    ".carry/gpu/bin/$v" bench --device cuda $ARGS --json-file "$OUT/$v-$r.json" > "$OUT/$v-$r.log" 2>&1
    echo "--- $v, round $r (batch or tokens, tok/s, ms)"
    grep -E "^ +[0-9]+ " "$OUT/$v-$r.log" | awk '{print $1, $2, $3}'
  done
done
