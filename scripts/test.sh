#!/usr/bin/env bash
# Installs dependencies, builds everything (CUDA code too where nvcc exists) and runs the whole
# test suite: C++ tests through CTest (MPI tests included), Python tests through pytest, then the
# C++ tests again under ASan + UBSan with each fuzz target fuzzed for a bounded time
# (scripts/sanitize.sh; SANITIZE=0 leaves that stage out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD=${BUILD_DIR:-build}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
ctest --test-dir "$BUILD" --output-on-failure -j"$(nproc)"
if [ -d python/tests ]; then
  PYTHONPATH="$PWD/$BUILD/python" /usr/bin/python3 -m pytest -q python/tests
fi
if [ "${SANITIZE:-1}" != 0 ]; then
  bash scripts/sanitize.sh
fi
