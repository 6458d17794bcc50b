#pragma once
// AVX-512 products of fp32 rows with bf16 or block-scaled FP8 weight rows (matmul.cpp picks them at
// run time when the CPU has AVX-512 F/BW/DQ/VL; the portable loops stay the fallback). The
// numerics are the portable path's: weights widened exactly to fp32 in registers, fp32 multiply-add,
// fp32 sums (in another order).
#include <cstdint>

#include "ballast/core/dtype.h"

namespace ballast::kernels::cpu::avx512 {

// Whether this CPU runs the kernels below (checked once).
bool available();

// The x layout the kernels read: each row padded with zeros to split_width(K) columns and, within
// every 32 columns, the 16 even ones first, then the 16 odd ones (as a 32-bit lane holds two bf16
// elements, low one even: masking and shifting a lane widens both in place, no shuffles).
inline int64_t split_width(int64_t K) { return (K + 31) / 32 * 32; }
void split_rows(const float* x, int64_t T, int64_t K, float* xs);

// y[t * ldy + i] = x[t] . w[i] for t < T, i < nb: xs is split_rows of x [T, K]; w points at nb rows
// of K elements (row stride K) of dtype BF16 or F8_E4M3_B128. FP8 rows widen through their block
// scales: w's first row is row scale_row0 of the tensor whose scales [N / 128, scales_ld] start at
// `scales` (row i's scales are scales + ((scale_row0 + i) / 128) * scales_ld). weights_stream: the
// weights come from memory, not from a cache (prefetches then go to L2 only; the results are the same).
void rows_product(const float* xs, int64_t T, int64_t K, const void* w, DType dt, int64_t nb, const float* scales,
                  int64_t scale_row0, int64_t scales_ld, float* y, int64_t ldy, bool weights_stream);

}  // namespace ballast::kernels::cpu::avx512
