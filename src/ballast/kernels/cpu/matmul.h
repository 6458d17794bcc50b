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
//
// Two implementations: the portable loops above, and AVX-512 tiles of dot products
// (avx512_matmul.h) for bf16 and FP8 weights at any number of rows, taken when the CPU has
// AVX-512 unless BALLAST_CPU_KERNELS=portable is set in the environment. Tests pass `isa` to run
// both on any machine that has both.
//
// weights_stream: the weights come from memory at every pass, not from a cache (the model's
// weights exceed the last-level cache: CpuBackend decides as they load); the AVX-512 few-row
// tiles then ask L2 only for the next rows, leaving L1's miss buffers to the loads. The results
// are the same either way.
enum class Isa { portable, avx512 };
Isa best_isa();  // avx512 when available (and not turned off), else portable
void matmul(const float* x, int64_t T, int64_t K, const Tensor& w, float* y, ThreadPool* pool,
            bool weights_stream = false);
void matmul(const float* x, int64_t T, int64_t K, const Tensor& w, float* y, ThreadPool* pool, Isa isa,
            bool weights_stream = false);

}  // namespace ballast::kernels::cpu
