#include "ballast/kernels/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/avx512_matmul.h"
#include "ballast/kernels/cpu/multiversion.h"

namespace ballast::kernels::cpu {

namespace {
constexpr int64_t kRowBlock = 64;
constexpr int64_t kSmallT = 8;  // up to this many rows (decode), stream weights without packing
constexpr int kLanes = 16;
// Below this many multiply-adds a product runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelWork = int64_t(1) << 16;

// Block scales of a F8_E4M3_B128 weight as the row loops read them: row n's scales are
// data + (n / 128) * ld, one per 128 columns.
struct RowScales {
  const float* data = nullptr;
  int64_t ld = 0;
  const float* row(int64_t n) const { return data + (n / kScaleBlock) * ld; }
};

RowScales row_scales(const Tensor& w) {
  if (w.dtype() != DType::F8_E4M3_B128) return {};
  return {static_cast<const float*>(w.scales().raw()), w.scales().dim(1)};
}

// One block-scaled row widened: out[k] = e4m3(q[k]) * s[k / 128], in fp32 as the checkpoint's
// dequantized weight is.
inline void widen_scaled_row(const uint8_t* q, const float* s, int64_t K, float* out) {
  for (int64_t k0 = 0; k0 < K; k0 += kScaleBlock) {
    const float sc = s[k0 / kScaleBlock];
    const int64_t k1 = std::min(K, k0 + kScaleBlock);
    for (int64_t k = k0; k < k1; ++k) out[k] = fp8e4m3_to_f32(q[k]) * sc;
  }
}

// y[t, n0 + i] = x[t] . w[n0 + i] for a few x rows (w points at row n0): each weight row is widened
// into a small buffer once and dotted with every x row in 16 independent lanes (vectorisable
// without reassociating), so a weight byte is read once and never packed. A single x row (decode)
// widens bf16 and block-scaled FP8 inside the dot: FP8 sums each 128-column block in fp32 and
// scales the block's sum.
BALLAST_MV void small_rows_product(const float* x, int64_t T, int64_t K, const char* w, DType dt, int64_t nb,
                                   RowScales scales, int64_t n0, float* y, int64_t ldy) {
  thread_local std::vector<float> row;
  row.resize(size_t(K));
  const size_t esize = dtype_size(dt);
  for (int64_t i = 0; i < nb; ++i) {
    if (dt == DType::F8_E4M3_B128 && T == 1) {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(w) + size_t(i * K);
      const float* s = scales.row(n0 + i);
      float sum = 0;
      for (int64_t k0 = 0; k0 < K; k0 += kScaleBlock) {
        const int64_t k1 = std::min(K, k0 + kScaleBlock);
        float acc[kLanes] = {};
        int64_t k = k0;
        for (; k + kLanes <= k1; k += kLanes)
          for (int j = 0; j < kLanes; ++j) acc[j] += x[k + j] * fp8e4m3_to_f32(src[k + j]);
        float block = 0;
        for (int j = 0; j < kLanes; ++j) block += acc[j];
        for (; k < k1; ++k) block += x[k] * fp8e4m3_to_f32(src[k]);
        sum += block * s[k0 / kScaleBlock];
      }
      y[i] = sum;
      continue;
    }
    if (dt == DType::BF16 && T == 1) {  // decode: widen inside the dot, one pass over the row
      const uint16_t* src = reinterpret_cast<const uint16_t*>(w + size_t(i * K) * esize);
      float acc[kLanes] = {};
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes)
        for (int j = 0; j < kLanes; ++j) acc[j] += x[k + j] * bf16_to_f32(src[k + j]);
      float sum = 0;
      for (int j = 0; j < kLanes; ++j) sum += acc[j];
      for (; k < K; ++k) sum += x[k] * bf16_to_f32(src[k]);
      y[i] = sum;
      continue;
    }
    const float* wr;
    if (dt == DType::F32) {
      wr = reinterpret_cast<const float*>(w + size_t(i * K) * esize);
    } else if (dt == DType::BF16) {  // inline here so that the AVX2 clone widens 8 at a time
      const uint16_t* src = reinterpret_cast<const uint16_t*>(w + size_t(i * K) * esize);
      for (int64_t k = 0; k < K; ++k) row[size_t(k)] = bf16_to_f32(src[k]);
      wr = row.data();
    } else if (dt == DType::F8_E4M3_B128) {
      widen_scaled_row(reinterpret_cast<const uint8_t*>(w) + size_t(i * K), scales.row(n0 + i), K, row.data());
      wr = row.data();
    } else {
      to_f32(w + size_t(i * K) * esize, dt, row.data(), size_t(K));
      wr = row.data();
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * K;
      float acc[kLanes] = {};
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes)
        for (int j = 0; j < kLanes; ++j) acc[j] += xt[k + j] * wr[k + j];
      float sum = 0;
      for (int j = 0; j < kLanes; ++j) sum += acc[j];
      for (; k < K; ++k) sum += xt[k] * wr[k];
      y[t * ldy + i] = sum;
    }
  }
}

// Products of many x rows with a block of fp32 weight rows, written to y[:, n0:n0+nb].
void block_product(const float* x, int64_t T, int64_t K, const float* wb, int64_t nb, float* y,
                   int64_t ldy) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(nb), int(K), 1.0f, x, int(K), wb,
              int(K), 0.0f, y, int(ldy));
}
}  // namespace

Isa best_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("BALLAST_CPU_KERNELS");
    if (env && std::strcmp(env, "portable") == 0) return Isa::portable;
    return avx512::available() ? Isa::avx512 : Isa::portable;
  }();
  return isa;
}

void matmul(const float* xp, int64_t T, int64_t K, const Tensor& w, float* yp, ThreadPool* pool,
            bool weights_stream) {
  matmul(xp, T, K, w, yp, pool, best_isa(), weights_stream);
}

void matmul(const float* xp, int64_t T, int64_t K, const Tensor& w, float* yp, ThreadPool* pool, Isa isa,
            bool weights_stream) {
  check(w.rank() == 2 && w.dim(1) == K, "matmul: weight {} for rows of {}", w, K);
  check(isa == Isa::portable || avx512::available(), "matmul: AVX-512 kernels asked for on a CPU without them");
  if (T == 0) return;
  const int64_t N = w.dim(0);
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  if (T * N * K < kParallelWork) pool = nullptr;
  const size_t esize = dtype_size(w.dtype());
  const RowScales scales = row_scales(w);
  if (isa == Isa::avx512 && (w.dtype() == DType::BF16 || w.dtype() == DType::F8_E4M3_B128)) {
    // x split once by the calling thread (the layout the tiles read), then blocks of weight rows
    // over the pool, each block's weights read once.
    thread_local std::vector<float> xs;
    xs.resize(size_t(T * avx512::split_width(K)));
    avx512::split_rows(xp, T, K, xs.data());
    const float* xsp = xs.data();  // the caller's buffer (a worker naming xs would get its own)
    auto run = [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * kRowBlock, n1 = std::min(N, b1 * kRowBlock);
      avx512::rows_product(xsp, T, K, static_cast<const char*>(w.raw()) + size_t(n0 * K) * esize, w.dtype(),
                           n1 - n0, scales.data, n0, scales.ld, yp + n0, N, weights_stream);
    };
    if (pool) pool->parallel_for(blocks, [&run](int64_t b0, int64_t b1) { run(b0, b1); });
    else run(0, blocks);
    return;
  }
  if (T <= kSmallT) {
    auto run_small = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kRowBlock, nb = std::min(kRowBlock, N - n0);
        small_rows_product(xp, T, K, static_cast<const char*>(w.raw()) + size_t(n0 * K) * esize, w.dtype(), nb,
                           scales, n0, yp + n0, N);
      }
    };
    if (pool) pool->parallel_for(blocks, [&run_small](int64_t b0, int64_t b1) { run_small(b0, b1); });
    else run_small(0, blocks);
    return;
  }
  auto run = [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> wbuf;  // one weight block widened to fp32
    if (w.dtype() != DType::F32) wbuf.resize(size_t(kRowBlock * K));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRowBlock, nb = std::min(kRowBlock, N - n0);
      const char* src = static_cast<const char*>(w.raw()) + size_t(n0 * K) * esize;
      const float* wb;
      if (w.dtype() == DType::F32) {
        wb = reinterpret_cast<const float*>(src);
      } else if (w.dtype() == DType::F8_E4M3_B128) {
        for (int64_t i = 0; i < nb; ++i)
          widen_scaled_row(reinterpret_cast<const uint8_t*>(src) + size_t(i * K), scales.row(n0 + i), K,
                           wbuf.data() + i * K);
        wb = wbuf.data();
      } else {
        to_f32(src, w.dtype(), wbuf.data(), size_t(nb * K));
        wb = wbuf.data();
      }
      block_product(xp, T, K, wb, nb, yp + n0, N);
    }
  };
  // The lambdas are passed by one reference, which std::function holds without allocating.
  if (pool) pool->parallel_for(blocks, [&run](int64_t b0, int64_t b1) { run(b0, b1); });
  else run(0, blocks);
}

}  // namespace ballast::kernels::cpu
