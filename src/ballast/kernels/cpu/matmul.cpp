#include "ballast/kernels/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/multiversion.h"

namespace ballast::kernels::cpu {

namespace {
constexpr int64_t kRowBlock = 64;
constexpr int64_t kSmallT = 8;  // up to this many rows (decode), stream weights without packing
constexpr int kLanes = 16;
// Below this many multiply-adds a product runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelWork = int64_t(1) << 16;

// y[t, n0 + i] = x[t] . w[i] for a few x rows: each bf16/f16/f32 weight row is widened into a
// small buffer once and dotted with every x row in 16 independent lanes (vectorisable without
// reassociating), so a weight byte is read once and never packed.
BALLAST_MV void small_rows_product(const float* x, int64_t T, int64_t K, const char* w, DType dt, int64_t nb,
                                   float* y, int64_t ldy) {
  thread_local std::vector<float> row;
  row.resize(size_t(K));
  const size_t esize = dtype_size(dt);
  for (int64_t i = 0; i < nb; ++i) {
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

void matmul(const float* xp, int64_t T, int64_t K, const Tensor& w, float* yp, ThreadPool* pool) {
  check(w.rank() == 2 && w.dim(1) == K, "matmul: weight {} for rows of {}", w, K);
  if (T == 0) return;
  const int64_t N = w.dim(0);
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  if (T * N * K < kParallelWork) pool = nullptr;
  const size_t esize = dtype_size(w.dtype());
  if (T <= kSmallT) {
    auto run_small = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kRowBlock, nb = std::min(kRowBlock, N - n0);
        small_rows_product(xp, T, K, static_cast<const char*>(w.raw()) + size_t(n0 * K) * esize, w.dtype(), nb,
                           yp + n0, N);
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
