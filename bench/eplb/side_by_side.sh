#!/bin/bash
# The speed check of issue 4 in one run on one core: the ORIGINAL deepseek-ai/EPLB (Python, torch,
# one thread) and ballast's planners on the same 48 x 512 load (64 ranks, 64 redundant), then the
# original again (the machine's load can drift between runs; the ratio uses the faster of the two).
#   [PYTHON=python-with-torch] bash bench/eplb/side_by_side.sh PATH/TO/eplb.py [BUILD_DIR] [CORE]
# The original is not part of this repository: fetch github.com/deepseek-ai/EPLB yourself.
set -euo pipefail
eplb_py=${1:?usage: side_by_side.sh PATH/TO/eplb.py [BUILD_DIR] [CORE]}
build=${2:-build}
core=${3:-1}
speed="$build/tests/eplb/eplb_speed"
[ -x "$speed" ] || { echo "missing $speed: cmake --build $build --target eplb_speed" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py() { taskset -c "$core" "${PYTHON:-python3}" tools/eplb_reference.py --eplb "$eplb_py" --time --repeat 2 "$@" | tail -2; }
py --weights-out "$tmp/w.txt" --timing-out "$tmp/py1.json"
taskset -c "$core" "$speed" "$tmp/w.txt" 20 | tee "$tmp/cpp.json"
py --timing-out "$tmp/py2.json"
python3 - "$tmp" <<'PY'
import json, sys
d = sys.argv[1]
def original(policy):
    return min(json.load(open(f"{d}/py{i}.json"))[policy]["min_ms"] for i in (1, 2))
for r in json.loads(open(f"{d}/cpp.json").read())["results"]:
    policy = "hierarchical_8x8" if "hierarchical" in r["algorithm"] else "global"
    py = original(policy)
    print(f"{r['algorithm']:40s} {r['min_ms']:8.2f} ms  {py / r['min_ms']:6.0f}x faster than the original {policy} ({py:.0f} ms)")
PY
