#!/usr/bin/env bash
# On the GPU machine: two builds of ballast side by side in one run, alternated ROUNDS times (the
# same machine and the same hour: machines differ by 5-20%, so compare only within one run).
# This build is the one scripts/gpu_pack.sh packed (.carry/gpu.tar.xz); the build to compare with
# comes alone in .carry/old.tar.xz (gpu/bin/ballast-old, ~4.5 MB), made here from an earlier pack:
#   tar -C /tmp/old -xJf OLD-gpu.tar.xz && mkdir -p /tmp/oldpack/gpu/bin &&
#   cp /tmp/old/gpu/bin/ballast /tmp/oldpack/gpu/bin/ballast-old &&
#   XZ_OPT=-9e tar -C /tmp/oldpack -cJf .carry/old.tar.xz gpu    # then carry both tarballs
# or put gpu/bin/ballast-old inside gpu.tar.xz itself: `BALLAST_BEFORE=<revision> bash
# scripts/gpu_pack.sh` builds that revision's ballast and packs it so (the two binaries share most
# of their bytes: the pack grew by ~0.9 MB in session 22).
# AB_ARGS: the bench arguments (default: the 80B shape in FP8 at full depth). AB_SWITCH (e.g.
# BALLAST_CUDA_SIDE_STREAM=0; several, space-separated; variables set together joined by commas,
# A=0,B=0): one more run a round for each, this build with that environment, after the variants
# (BINARY:A=0 runs that binary of .carry/gpu/bin with it instead, e.g. ballast-old:A=0); a switch
# that starts with -- is a bench flag instead (e.g. --disable-overlap-schedule; BINARY:--flag too).
# AB_VARIANTS: the binaries of .carry/gpu/bin alternated (default "ballast-old ballast"; gpu_pack.sh
# packs several earlier revisions as ballast-<revision>).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ballast-ab}
mkdir -p "$OUT"
# The device tool brings back at most 8 files from $OUT: each run's log goes to a scratch folder and
# is appended to one file, $OUT/ab-runs.log; the table is printed.
RUNS=$(mktemp -d)
. scripts/gpu_env.sh
[ -f .carry/old.tar.xz ] && tar -C .carry -xJf .carry/old.tar.xz  # (or ballast-old packed inside gpu.tar.xz)
ARGS=${AB_ARGS:-"--synthetic qwen3-next-80b-a3b --dtype fp8 --layers 48 --batch 1,8,32,128 --prompt-len 1024 --decode-steps 32 --prefill 1024 --repeats 1"}
VARIANTS=${AB_VARIANTS:-"ballast-old ballast"}
SWITCHES=(${AB_SWITCH:-})
[ ${#SWITCHES[@]} -gt 0 ] && VARIANTS="$VARIANTS $(seq -f 'switched%g' -s ' ' 1 ${#SWITCHES[@]})"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for v in $VARIANTS; do
    bin=$v envs=() flags=()
    if [[ $v == switched* ]]; then
      sw=${SWITCHES[$((${v#switched} - 1))]} bin=ballast
      [[ $sw == *:* ]] && bin=${sw%%:*} sw=${sw#*:}
      if [[ $sw == --* ]]; then flags=("$sw"); else IFS=, read -ra envs <<< "$sw"; fi
    fi
    # shellcheck disable=SC2086
    env "${envs[@]}" ".carry/gpu/bin/$bin" bench --device cuda $ARGS "${flags[@]}" > "$RUNS/$v-$r.log" 2>&1
    what="$bin${envs:+ ${envs[*]}}${flags:+ ${flags[*]}}"
    { echo "=== $v ($what), round $r"; cat "$RUNS/$v-$r.log"; } >> "$OUT/ab-runs.log"
    echo "--- $v ($what), round $r (batch or tokens, tok/s, ms)"
    grep -E "^ +[0-9]+ " "$RUNS/$v-$r.log" | awk '{print $1, $2, $3}'
  done
done
rm -rf "$RUNS"
