#pragma once
// Causal depthwise conv1d + SiLU (the short convolution in front of Gated DeltaNet, docs/model.md).
#include <cstdint>

namespace ballast {
class ThreadPool;
}

namespace ballast::kernels::cpu {

// Causal depthwise conv1d over T steps of ONE sequence, followed by SiLU.
//   x:      [T, C], row stride ldx (floats)
//   weight: [C, kc]; row c holds channel c's taps, oldest first:
//           out[t, c] = silu( sum_j weight[c, j] * in[t - (kc-1) + j, c] )
//   state:  [C, kc-1], the last kc-1 inputs before x (oldest first; zeros at sequence start);
//           updated in place to the last kc-1 inputs after x.
//   out:    [T, C], row stride ldo. May not alias x.
// Works for any T >= 0 (T = 1 is decode; T < kc-1 keeps part of the old state).
// pool may be null (single thread); work is split over channel blocks.
void causal_conv1d_silu(const float* x, int64_t ldx, int T, int C, const float* weight, int kc,
                        float* state, float* out, int64_t ldo, ThreadPool* pool);

}  // namespace ballast::kernels::cpu
