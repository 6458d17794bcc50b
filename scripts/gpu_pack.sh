#!/usr/bin/env bash
# Builds ballast with its CUDA backend here (where the Debian -dev packages are) and packs what
# scripts/gpu_check.sh runs on the GPU machine into .carry/gpu.tar.xz: the binaries and the few
# shared libraries that machine lacks (it has CUDA, cuBLAS and a newer glibc / libstdc++). With
# FLA_REPO=<a git directory of flash-linear-attention>, its fla/ package goes to .carry/fla for
# bench/deltanet/side_by_side.py (never into the repository). With DELTA_RULE_BEFORE=<a git
# revision> too, that revision's bench_delta_rule_cuda is built in a worktree of its own
# (/tmp/ballast-delta-rule-before/<revision>) and packed as bench_delta_rule_cuda-before: the side by side then
# alternates the two builds (an A/B of a delta-rule change in one run). With BALLAST_BEFORE=<a git
# revision>, that revision's ballast is built likewise and packed as ballast-old, the binary
# scripts/gpu_ab.sh alternates with this one (~0.9 MB more in the pack); with several revisions
# (BALLAST_BEFORE="A B"), each is packed as ballast-<revision> (A also as ballast-old), for
# AB_VARIANTS="ballast-A ballast-B ballast" (one change after another in one run). The CUDA code is
# built as sm_90a machine code alone, without PTX (since session 48: the PTX was ~2/3 of a binary
# under xz): a ballast is ~2.7 MB of the pack, and everything one call needs, `FLA_REPO=...
# DELTA_RULE_BEFORE=R BALLAST_BEFORE=R PACK_TESTS=cuda` (two ballasts, test_kernels_cuda and
# test_runtime, two delta-rule benches), 10.8 MB, 5.9 of it the libraries; the tracked tree is ~50 MB
# of the 64 MiB the device tool carries (untracked build folders aside; ~63 MB in all went, 66.9 was
# refused in session 31), .carry/fla ~1.5 MB. PACK_TESTS=0 packs no tests, PACK_BALLAST=0 no
# ballast (with PACK_TESTS=kernels: a delta-rule A/B alone). The total is printed at the end.
# BALLAST_OLD=<a ballast binary built earlier> packs that file as ballast-old (no worktree build:
# keep a copy of the baseline's binary before changing the tree; built by this script, so without
# PTX), and EXTRA_BINS="name=path ..." packs more files into gpu/bin (another build, a probe). On the
# device, e.g. `STEPS="conformance deltanet" CONFORMANCE_FILTER='*DeltaNet*' DELTANET_ARGS="--precisions
# bf16" bash scripts/gpu_check.sh`, then scripts/gpu_ab.sh.
#   bash scripts/gpu_pack.sh   ->  then carry .carry (see scripts/gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD_DIR:-build-gpu}
# sm_90a code alone, no PTX: the GPU machine is a Hopper, and the PTX was ~2/3 of a CUDA object under
# xz (cuda_deltanet.cu's: 769 KB with it, 254 KB without).
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBALLAST_PYTHON=OFF -DCMAKE_CUDA_ARCHITECTURES=90a-real >/dev/null
# The delta-rule bench only for the FLA side by side (FLA_REPO below): the device tool carries 64 MiB in all.
EXTRA=(); [ -n "${FLA_REPO:-}" ] && EXTRA=(bench_delta_rule_cuda)
# The test binaries (paths in the build; their names are the targets). PACK_TESTS=cuda: the one-GPU
# ones only (no NCCL ones: ~3 MB less, room for a third ballast).
TESTS=()
case "${PACK_TESTS:-1}" in
  1) TESTS=(tests/kernels/test_kernels_cuda tests/runtime/test_runtime tests/dist/test_dist_nccl tests/dist/bench_dist) ;;
  cuda) TESTS=(tests/kernels/test_kernels_cuda tests/runtime/test_runtime) ;;
  kernels) TESTS=(tests/kernels/test_kernels_cuda) ;;
esac
MAIN=(ballast); [ "${PACK_BALLAST:-1}" = 0 ] && MAIN=()
cmake --build "$BUILD" -j"$(nproc)" --target "${MAIN[@]}" "${TESTS[@]##*/}" "${EXTRA[@]}"
rm -rf .carry/gpu && mkdir -p .carry/gpu/bin .carry/gpu/lib
for m in "${MAIN[@]}"; do cp "$BUILD/$m" .carry/gpu/bin/; done
for t in "${TESTS[@]}"; do cp "$BUILD/$t" .carry/gpu/bin/; done
[ -n "${FLA_REPO:-}" ] && cp "$BUILD/bench/kernels/bench_delta_rule_cuda" .carry/gpu/bin/
# build_before REVISION TARGET: the target built at that revision, in a worktree of its own; its path.
build_before() {
  local rev before
  rev=$(git rev-parse --short "$1") before=/tmp/ballast-delta-rule-before/$rev
  [ -d "$before" ] || git worktree add --detach "$before" "$rev" >/dev/null
  # (revisions before session 48 took sm_90a's kernels only where the list says "90a": the flag
  # defines what that gave them)
  cmake -S "$before" -B "$before/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBALLAST_PYTHON=OFF \
    -DCMAKE_CUDA_ARCHITECTURES=90a-real -DCMAKE_CUDA_FLAGS=-DBALLAST_CUDA_SM90A=1 >/dev/null
  cmake --build "$before/build" -j"$(nproc)" --target "$2" >&2
  find "$before/build" -name "$2" -type f -perm -u+x | head -1
}
if [ -n "${FLA_REPO:-}" ] && [ -n "${DELTA_RULE_BEFORE:-}" ]; then
  cp "$(build_before "$DELTA_RULE_BEFORE" bench_delta_rule_cuda)" .carry/gpu/bin/bench_delta_rule_cuda-before
fi
[ -n "${BALLAST_OLD:-}" ] && cp "$BALLAST_OLD" .carry/gpu/bin/ballast-old
for kv in ${EXTRA_BINS:-}; do cp "${kv#*=}" ".carry/gpu/bin/${kv%%=*}"; done
first=1
for rev in ${BALLAST_BEFORE:-}; do  # each as ballast-<revision>, the first also as ballast-old
  bin=.carry/gpu/bin/ballast-$(git rev-parse --short "$rev")
  cp "$(build_before "$rev" ballast)" "$bin"
  [ $first = 1 ] && cp "$bin" .carry/gpu/bin/ballast-old
  first=0
done
# Libraries from Debian's packages (not CUDA's, not glibc's or the compiler runtime's).
for exe in .carry/gpu/bin/*; do
  ldd "$exe" | awk '{print $3}' | grep -E 'libfmt|libopenblas|libgfortran|libquadmath|libpcre2|libutf8proc|libprometheus|libcpp-httplib|libbrotli' || true
done | sort -u | while read -r lib; do cp -L "$lib" .carry/gpu/lib/; done
strip --strip-unneeded .carry/gpu/bin/* 2>/dev/null || true  # symbols only: the device tool carries 64 MiB in all
# xz -9: a 64 MiB window finds what the three binaries share (18.8 MB at the default -6, 11.2 at -9e)
XZ_OPT="-9e -T0" tar -C .carry -cJf .carry/gpu.tar.xz gpu
rm -rf .carry/gpu
if [ -n "${FLA_REPO:-}" ]; then
  rm -rf .carry/fla && mkdir -p .carry/fla
  git --git-dir="$FLA_REPO" archive HEAD fla | tar -C .carry/fla -x
  # Only what chunk_gated_delta_rule imports (its models, layers and other ops, ~4 MB, are never
  # imported by the side by side; fla.ops's __init__ would import every op): under 64 MiB.
  rm -rf .carry/fla/fla/models .carry/fla/fla/layers
  find .carry/fla/fla/ops -mindepth 1 -maxdepth 1 -type d \
    -not -name gated_delta_rule -not -name common -not -name utils -not -name cp -not -name backends -not -name attn \
    -exec rm -rf {} +
  echo 'from .gated_delta_rule import chunk_gated_delta_rule' > .carry/fla/fla/ops/__init__.py
  git --git-dir="$FLA_REPO" log -1 --format='flash-linear-attention %H %cs' > .carry/fla/VERSION
fi
ls -la .carry/gpu.tar.xz
tracked=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
carried=$(du -sb .carry | cut -f1)
# (session 31: 62.9 MB in all was carried, 66.9 MB refused as over 64 MiB: keep it under ~63 MB)
echo "carry: tracked tree $((tracked / 1000000)) MB + .carry $((carried / 1000000)) MB = $(((tracked + carried) / 1000000)) MB"
