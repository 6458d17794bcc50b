#pragma once
#include "ballast/core/tensor.h"
#include "ballast/core/thread_pool.h"

namespace ballast::kernels::cpu {

// y[T, N] = x[T, K] @ w[N, K]^T with fp32 accumulation, on raw rows: x [T, K] and y [T, w.dim(0)],
// contiguous (CpuOps::matmul's tensors, checked by check_matmul, or scratch that has no Tensor).
// w is read in place in its storage dtype (F8_E4M3_B128 through its block scales: each element is
// its e4m3 value times its 128 x 128 block's scale, accumulated in fp32). Few rows (decode): each weight row is widened once and
// dotted with every x row (no packing). Many rows (prefill): blocks of weight rows are widened
// into a per-thread buffer and multiplied with single-threaded BLAS. Either way a weight byte is
// read once per call.
void matmul(const float* x, int64_t T, int64_t K, const Tensor& w, float* y, ThreadPool* pool);

}  // namespace ballast::kernels::cpu
