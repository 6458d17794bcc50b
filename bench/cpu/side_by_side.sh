#!/usr/bin/env bash
# CPU throughput of this tree beside an earlier commit, in one run: `ballast bench` on the shipped
# demo model and on the synthetic mid-size model (H=1024, 8 layers, 64 experts top-8, bf16),
# the two binaries alternating over ROUNDS rounds on the same machine; prints the median of each
# figure and the ratio this tree / the old one (above 1: faster).
#
#   bash bench/cpu/side_by_side.sh [OLD_REV (28fc4d2, before the device-ready core)] [ROUNDS (5)] [THREADS (0: all)]
#
# The old commit is exported with `git archive` and built once under $OLD_DIR (default
# /tmp/ballast-OLD_REV); this tree's binary is $BUILD_DIR/ballast (default build).
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=${1:-28fc4d2}
ROUNDS=${2:-5}
THREADS=${3:-0}
NEW_BUILD=${BUILD_DIR:-build}
OLD_DIR=${OLD_DIR:-/tmp/ballast-$OLD}

cmake --build "$NEW_BUILD" --target ballast >/dev/null
if [ ! -x "$OLD_DIR/build/ballast" ]; then
  rm -rf "$OLD_DIR" && mkdir -p "$OLD_DIR"
  git archive "$OLD" | tar -x -C "$OLD_DIR"
  cmake -S "$OLD_DIR" -B "$OLD_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBALLAST_TESTS=OFF \
    -DBALLAST_BENCH=OFF -DBALLAST_PYTHON=OFF >/dev/null
  cmake --build "$OLD_DIR/build" --target ballast >/dev/null
fi

python3 - "$OLD_DIR/build/ballast" "$NEW_BUILD/ballast" "$ROUNDS" "$THREADS" "$OLD" <<'PY'
import json, statistics, subprocess, sys
old, new, rounds, threads, rev = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
cases = {
    "demo model, 128-token prompt, 64 decode steps": ["--prompt-len", "128", "--decode-steps", "64"],
    "synthetic mid-size, 256-token prompt, 32 decode steps": ["--synthetic", "--prompt-len", "256", "--decode-steps", "32"],
}
figures = ("prefill_tokens_per_s", "decode_tokens_per_s")
runs = {(c, b): {f: [] for f in figures} for c in cases for b in ("old", "new")}
for r in range(rounds):
    for case, args in cases.items():
        for which, exe in (("old", old), ("new", new)):
            out = subprocess.run([exe, "bench", "--json", "--threads", threads, *args], capture_output=True, text=True,
                                 check=True).stdout
            j = json.loads(out)
            for f in figures:
                runs[(case, which)][f].append(j[f])
print(f"ballast bench, this tree vs {rev}, median of {rounds} alternating rounds (tokens/s)")
print(f"{'case':56} {'figure':8} {rev:>10} {'this tree':>10} {'ratio':>6}")
for case in cases:
    for f in figures:
        o = statistics.median(runs[(case, "old")][f])
        n = statistics.median(runs[(case, "new")][f])
        print(f"{case:56} {f.split('_')[0]:8} {o:10.1f} {n:10.1f} {n / o:6.2f}")
PY
