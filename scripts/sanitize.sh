#!/usr/bin/env bash
# The C++ suite under AddressSanitizer + UndefinedBehaviorSanitizer (clang, -O1; every finding is
# fatal), then each libFuzzer target (tests/fuzz) fuzzed for FUZZ_SECONDS from its committed corpus.
# Called by scripts/test.sh. SANITIZE_LABELS_EXCLUDE: ctest labels left out (default: cuda, which
# needs a GPU); FUZZ_SECONDS=0 replays the corpora only. Inputs that fail land in $FUZZ_ARTIFACTS.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${SANITIZE_BUILD_DIR:-build-sanitize}
FUZZ_SECONDS=${FUZZ_SECONDS:-15}
FUZZ_ARTIFACTS=${FUZZ_ARTIFACTS:-$BUILD/fuzz-artifacts}

CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBALLAST_SANITIZE=address,undefined -DBALLAST_FUZZ=ON -DBALLAST_CUDA=OFF -DBALLAST_PYTHON=OFF -DBALLAST_BENCH=OFF >/dev/null
cmake --build "$BUILD" -j"$(nproc)"

# allocator_may_return_null: an allocation too large is std::bad_alloc (the engine's error), as
# without ASan. Tests under mpirun run without LeakSanitizer: Open MPI keeps memory until exit in
# plugins it has unloaded by then, which LeakSanitizer can neither name nor suppress.
export ASAN_OPTIONS=allocator_may_return_null=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
EXCLUDE=${SANITIZE_LABELS_EXCLUDE:-cuda}
# Tests that repeat whole model passes many times over, 4-60x slower sanitized (a statistical test:
# 9 s -> over 9 min; two equivalence tests of batching: 4-5 min each): their code paths run in the
# others too.
SKIP='^(Sampler\.SpeculativeSamplingMatchesPlainSamplingOnAModel|ContinuousBatching\.EveryOutputEqualsThePromptAlone|serve_batching_invariance)$'
ctest --test-dir "$BUILD" --output-on-failure -j"$(nproc)" -LE "$EXCLUDE|mpi" -E "$SKIP"
ASAN_OPTIONS=$ASAN_OPTIONS:detect_leaks=0 ctest --test-dir "$BUILD" --output-on-failure -j"$(nproc)" -L mpi -LE "$EXCLUDE"

if [ "$FUZZ_SECONDS" -gt 0 ]; then
  mkdir -p "$FUZZ_ARTIFACTS"
  for bin in "$BUILD"/tests/fuzz/fuzz_*; do
    target=$(basename "$bin"); target=${target#fuzz_}
    found=$(mktemp -d)  # new inputs go here, not into the committed corpus
    "$bin" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -artifact_prefix="$FUZZ_ARTIFACTS/$target-" "$found" "tests/fuzz/corpus/$target" 2>"$found.log" || {
      tail -60 "$found.log"; echo "fuzz: $target failed, input saved under $FUZZ_ARTIFACTS"; exit 1; }
    echo "fuzz: $target ok: $(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$found.log"), $(ls "$found" | wc -l) new inputs"
    rm -rf "$found" "$found.log"
  done
fi
echo "sanitize: ok"
