#!/usr/bin/env bash
# Builds ballast with its CUDA backend here (where the Debian -dev packages are) and packs what
# scripts/gpu_check.sh runs on the GPU machine into .carry/gpu.tar.xz: the binaries and the few
# shared libraries that machine lacks (it has CUDA, cuBLAS and a newer glibc / libstdc++).
#   bash scripts/gpu_pack.sh   ->  then carry .carry (see scripts/gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD_DIR:-build-gpu}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBALLAST_PYTHON=OFF >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target ballast test_kernels_cuda test_runtime test_moe
rm -rf .carry/gpu && mkdir -p .carry/gpu/bin .carry/gpu/lib
cp "$BUILD/ballast" "$BUILD/tests/kernels/test_kernels_cuda" "$BUILD/tests/runtime/test_runtime" \
   "$BUILD/tests/moe/test_moe" .carry/gpu/bin/
# Libraries from Debian's packages (not CUDA's, not glibc's or the compiler runtime's).
for exe in .carry/gpu/bin/*; do
  ldd "$exe" | awk '{print $3}' | grep -E 'libfmt|libopenblas|libgfortran|libquadmath|libpcre2|libutf8proc' || true
done | sort -u | while read -r lib; do cp -L "$lib" .carry/gpu/lib/; done
tar -C .carry -cJf .carry/gpu.tar.xz gpu
rm -rf .carry/gpu
ls -la .carry/gpu.tar.xz
