#pragma once
#include "ballast/core/tensor.h"
#include "ballast/core/thread_pool.h"

namespace ballast::kernels::cpu {

// y[T, N] = x[T, K] @ w[N, K]^T with fp32 accumulation. w is read in place in its storage dtype:
// blocks of rows are widened to fp32 in a per-thread buffer and multiplied with single-threaded
// BLAS, so a decode step streams each weight byte once.
void matmul(const Tensor& x, const Tensor& w, Tensor& y, ThreadPool* pool);

}  // namespace ballast::kernels::cpu
