#include "ballast/kernels/cpu/causal_conv1d.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/core/thread_pool.h"
#include "ballast/kernels/cpu/op_support.h"

namespace ballast::kernels::cpu {

namespace {

constexpr int kBlock = 64;  // channels per work item; the inner loops run across channels

// Channels [c0, c0 + nc). Taps and history are transposed into [tap][channel] so that every inner
// loop is unit-stride over channels.
void conv_block(const float* x, int64_t ldx, int T, int c0, int nc, const float* weight, int kc, float* state,
                float* out, int64_t ldo) {
  const int ks = kc - 1;
  float wt[16][kBlock];          // taps, [j][c]
  float hist[15][kBlock];        // old state, [i][c] (oldest first)
  float acc[kBlock];
  for (int c = 0; c < nc; ++c) {
    for (int j = 0; j < kc; ++j) wt[j][c] = weight[int64_t(c0 + c) * kc + j];
    for (int i = 0; i < ks; ++i) hist[i][c] = state[int64_t(c0 + c) * ks + i];
  }
  for (int t = 0; t < T; ++t) {
    for (int c = 0; c < nc; ++c) acc[c] = 0.f;
    for (int j = 0; j < kc; ++j) {
      const int s = t - ks + j;  // input step; < 0 reads the old state
      const float* src = s >= 0 ? x + int64_t(s) * ldx + c0 : hist[ks + s];
      const float* w = wt[j];
      for (int c = 0; c < nc; ++c) acc[c] += w[c] * src[c];
    }
    float* o = out + int64_t(t) * ldo + c0;
    for (int c = 0; c < nc; ++c) o[c] = silu(acc[c]);
  }
  // New state: the last ks inputs of [old state | x].
  for (int i = 0; i < ks; ++i) {
    const int s = T - ks + i;
    const float* src = s >= 0 ? x + int64_t(s) * ldx + c0 : hist[ks + s];
    for (int c = 0; c < nc; ++c) state[int64_t(c0 + c) * ks + i] = src[c];
  }
}

}  // namespace

void causal_conv1d_silu(const float* x, int64_t ldx, int T, int C, const float* weight, int kc, float* state,
                        float* out, int64_t ldo, ThreadPool* pool) {
  check(T >= 0 && C > 0, "causal_conv1d_silu: bad shape T={} C={}", T, C);
  check(kc >= 1 && kc <= 16, "causal_conv1d_silu: kernel size {} not in [1, 16]", kc);
  check(T == 0 || (ldx >= C && ldo >= C), "causal_conv1d_silu: row strides ldx={} ldo={} < C={}", ldx, ldo, C);
  const int64_t nblocks = (C + kBlock - 1) / kBlock;
  auto run = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int c0 = int(b * kBlock);
      conv_block(x, ldx, T, c0, std::min(kBlock, C - c0), weight, kc, state, out, ldo);
    }
  };
  // Decode (small T) is too little work to be worth waking the pool for narrow layers.
  if (pool && int64_t(T) * C * kc >= (1 << 15))
    pool->parallel_for(nblocks, [&run](int64_t b0, int64_t b1) { run(b0, b1); });
  else
    run(0, nblocks);
}

}  // namespace ballast::kernels::cpu
