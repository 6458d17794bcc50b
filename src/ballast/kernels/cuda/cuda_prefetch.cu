// CudaOps::prefetch (ops.h "hints"): weights brought into L2 ahead of the product that reads them.
// A batch-1 decode step streams each layer's ~70 MB of weights (80B shape, FP8) through a handful
// of products, with a dozen small kernels between them (norms, conv, the delta rule, routing)
// during which the memory idles; a prefetch issued where a product ends fills that idle time with
// the next product's weights, which that product then reads from L2. The prefetch kernel is one
// block on a stream of its own (no node on the step's chain of kernels): it only issues bulk
// prefetches and ends; the copies run on in the memory system.
#include <algorithm>

#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_support.cuh"

namespace ballast::kernels {

using cuda::check_launch;
using cuda::launch;

namespace {

constexpr int kPrefetchThreads = 128;

struct PrefetchRanges {
  static constexpr int kMax = 8;
  const void* p[kMax];
  uint64_t bytes[kMax];
  int n;
};

__global__ void __launch_bounds__(kPrefetchThreads) prefetch_kernel(PrefetchRanges r) {
  for (int i = 0; i < r.n; ++i) cuda::prefetch_l2(r.p[i], r.bytes[i], threadIdx.x, blockDim.x);
}

}  // namespace

void CudaOps::prefetch(std::span<const Tensor> weights) {
  PrefetchRanges r{};
  size_t left = prefetch_budget();
  for (const Tensor& w : weights) {
    if (r.n == PrefetchRanges::kMax || left == 0) break;
    if (!w.defined() || w.device() != Device::CUDA) continue;
    const size_t n = std::min(w.nbytes(), left);  // (a block-scaled one's scales, 1 / 16,384 of it, left out)
    r.p[r.n] = w.raw();
    r.bytes[r.n++] = n;
    left -= n;
  }
  if (r.n == 0) return;
  cudaStream_t s = begin_prefetch();
  if (s == nullptr) return;
  launch(prefetch_kernel, 1, kPrefetchThreads, 0, s, r);
  check_launch("prefetch");
  end_prefetch();
}

}  // namespace ballast::kernels
