// matmul's two implementations, each against a double-precision reference over awkward
// shapes: the portable loops everywhere, the AVX-512 tiles wherever the CPU has AVX-512 (skipped,
// and said so, where it has not). Rows of x 1..9, 17 and 64+ (every tile height and its
// remainders), K below, at and beside multiples of 32 and of the 128-column FP8 blocks, N across
// row tiles and the 64-row blocks, with and without a pool.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "ballast/core/dtype.h"
#include "ballast/core/tensor.h"
#include "ballast/core/thread_pool.h"
#include "ballast/kernels/cpu/avx512_matmul.h"
#include "ballast/kernels/cpu/matmul.h"

namespace ballast::kernels::cpu {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (auto& e : v) e = nd(rng);
  return v;
}

struct Weight {
  Tensor tensor;
  std::vector<float> stored;  // the values the product must use, as fp32
};

// Random weights [N, K] stored in dt; FP8 with one scale per 128 x 128 block (its amax / 448,
// and a different magnitude per block, so a wrong block's scale shows).
Weight make_weight(DType dt, int64_t N, int64_t K, uint32_t seed) {
  const std::vector<float> v = randn(size_t(N * K), seed, 0.2f);
  Weight w;
  w.stored.resize(v.size());
  if (dt == DType::F8_E4M3_B128) {
    const int64_t SR = scale_blocks(N), SC = scale_blocks(K);
    Tensor q = Tensor::zeros({N, K}, DType::F8_E4M3), s = Tensor::zeros({SR, SC}, DType::F32);
    for (int64_t br = 0; br < SR; ++br)
      for (int64_t bc = 0; bc < SC; ++bc) s.data<float>()[br * SC + bc] = 0.2f * float(1 + br + 3 * bc) / 448.0f;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const float sc = s.data<float>()[(n / kScaleBlock) * SC + k / kScaleBlock];
        const uint8_t e = f32_to_e4m3(v[size_t(n * K + k)] * float(1 + n / kScaleBlock + 3 * (k / kScaleBlock)) / sc);
        q.data<uint8_t>()[n * K + k] = e;
        w.stored[size_t(n * K + k)] = fp8e4m3_to_f32(e) * sc;
      }
    w.tensor = Tensor::block_scaled(q, s);
    return w;
  }
  w.tensor = Tensor::zeros({N, K}, dt);
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == DType::F32) w.tensor.data<float>()[i] = w.stored[i] = v[i];
    else if (dt == DType::BF16) w.stored[i] = bf16_to_f32(w.tensor.data<uint16_t>()[i] = f32_to_bf16(v[i]));
    else w.stored[i] = f16_to_f32(w.tensor.data<uint16_t>()[i] = f32_to_f16(v[i]));
  }
  return w;
}

// y against the double reference: within 4e-7 * K^(1/2)-ish of sum |x||w| (fp32 accumulation in
// lanes, a few ulps of the largest partial sum), taken as 2e-6 of sum |x||w| per output.
void expect_product(Isa isa, DType dt, int64_t T, int64_t K, int64_t N, ThreadPool* pool) {
  const Weight w = make_weight(dt, N, K, uint32_t(7 * N + K));
  const std::vector<float> x = randn(size_t(T * K), uint32_t(T * 131 + K));
  std::vector<float> y(size_t(T * N), -1.0f);
  matmul(x.data(), T, K, w.tensor, y.data(), pool, isa);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(x[size_t(t * K + k)]) * w.stored[size_t(n * K + k)];
        sum += p;
        mag += std::abs(p);
      }
      const double got = y[size_t(t * N + n)];
      ASSERT_NEAR(got, sum, 2e-6 * std::max(mag, 1e-3))
          << dtype_name(dt) << " T=" << T << " K=" << K << " N=" << N << " at (" << t << ", " << n << ")"
          << (pool ? " with a pool" : "");
    }
}

void sweep(Isa isa, ThreadPool* pool) {
  for (DType dt : {DType::BF16, DType::F8_E4M3_B128, DType::F32, DType::F16})
    for (int64_t T : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 67})
      for (int64_t K : {1, 31, 32, 33, 70, 200, 259})
        for (int64_t N : {1, 7, 65, 130}) expect_product(isa, dt, T, K, N, pool);
  // FP8 blocks of 128 rows crossed inside a 64-row block's tiles, and a 129th row of scales.
  expect_product(isa, DType::F8_E4M3_B128, 3, 384, 300, pool);
  expect_product(isa, DType::BF16, 130, 1024, 96, pool);
}

TEST(CpuMatmul, PortableLoopsMatchTheReference) {
  sweep(Isa::portable, nullptr);
  ThreadPool pool(3);
  sweep(Isa::portable, &pool);
}

TEST(CpuMatmul, Avx512TilesMatchTheReference) {
  if (!avx512::available()) GTEST_SKIP() << "skipped: this CPU has no AVX-512 F/BW/DQ/VL";
  sweep(Isa::avx512, nullptr);
  ThreadPool pool(3);
  sweep(Isa::avx512, &pool);
}

// Weights that stream from memory change where decode's prefetches go (L2 only), never the
// results: bit for bit the same as the cached path, bf16 and FP8, at the few-row tiles' every T.
TEST(CpuMatmul, StreamingWeightsGiveTheSameBits) {
  for (Isa isa : {Isa::portable, Isa::avx512}) {
    if (isa == Isa::avx512 && !avx512::available()) continue;
    for (DType dt : {DType::BF16, DType::F8_E4M3_B128})
      for (int64_t T : {1, 2, 3, 4, 9}) {
        const int64_t K = 259, N = 130;
        const Weight w = make_weight(dt, N, K, uint32_t(5 * T + 1));
        const std::vector<float> x = randn(size_t(T * K), uint32_t(T + 11));
        std::vector<float> cached(size_t(T * N)), streamed(size_t(T * N), -1.0f);
        matmul(x.data(), T, K, w.tensor, cached.data(), nullptr, isa, false);
        matmul(x.data(), T, K, w.tensor, streamed.data(), nullptr, isa, true);
        EXPECT_EQ(streamed, cached) << dtype_name(dt) << " T=" << T;
      }
  }
}

// e4m3's whole range through the AVX-512 widening: every byte value (subnormals, both zeros, the
// largest normals) as a weight row, dotted with one-hot x rows, is exactly e4m3(q) * scale, for
// scales below 2^7 (the kernel's one multiply by 2^120 s) and above (two multiplies).
TEST(CpuMatmul, Avx512WidensEveryE4m3ByteExactly) {
  if (!avx512::available()) GTEST_SKIP() << "skipped: this CPU has no AVX-512 F/BW/DQ/VL";
  const int64_t K = 512;
  Tensor q = Tensor::zeros({1, K}, DType::F8_E4M3), s = Tensor::zeros({1, 4}, DType::F32);
  for (int64_t k = 0; k < K; ++k) q.data<uint8_t>()[k] = uint8_t(k);
  s.data<float>()[0] = 0.375f;
  s.data<float>()[1] = 3.0e-3f;
  s.data<float>()[2] = 200.0f;
  s.data<float>()[3] = 5.0e3f;
  const Tensor w = Tensor::block_scaled(q, s);
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 0x7F) == 0x7F) continue;  // e4m3's NaN encodings (the kernel gives +-480 times the scale)
    std::vector<float> x(size_t(K), 0.0f);
    x[size_t(k)] = 1.0f;
    float y = 0;
    matmul(x.data(), 1, K, w, &y, nullptr, Isa::avx512);
    const float want = fp8e4m3_to_f32(uint8_t(k % 256)) * s.data<float>()[k / 128];
    EXPECT_EQ(y, want) << "byte " << k;
  }
}

TEST(CpuMatmul, TheDefaultIsTheBestTheCpuHas) {
  EXPECT_EQ(best_isa() == Isa::avx512, avx512::available() && !std::getenv("BALLAST_CPU_KERNELS"));
}

}  // namespace
}  // namespace ballast::kernels::cpu
