#include "ballast/kernels/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <vector>

#include "ballast/core/error.h"

namespace ballast::kernels::cpu {

namespace {
constexpr int64_t kRowBlock = 64;

// Dot products of x rows against a block of fp32 weight rows, written to y[:, n0:n0+nb].
void block_product(const float* x, int64_t T, int64_t K, const float* wb, int64_t nb, float* y,
                   int64_t ldy) {
  if (T == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, int(nb), int(K), 1.0f, wb, int(K), x, 1, 0.0f, y, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(nb), int(K), 1.0f, x, int(K), wb,
              int(K), 0.0f, y, int(ldy));
}
}  // namespace

void matmul(const Tensor& x, const Tensor& w, Tensor& y, ThreadPool* pool) {
  check(x.rank() == 2 && w.rank() == 2 && y.rank() == 2, "matmul: expected 2-d tensors, got x{} w{} y{}",
        x.shape_str(), w.shape_str(), y.shape_str());
  const int64_t T = x.dim(0), K = x.dim(1), N = w.dim(0);
  check(w.dim(1) == K && y.dim(0) == T && y.dim(1) == N, "matmul: shapes x{} w{} y{} do not agree",
        x.shape_str(), w.shape_str(), y.shape_str());
  if (T == 0) return;
  const float* xp = x.f32();
  float* yp = y.f32();
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const size_t esize = dtype_size(w.dtype());
  auto run = [&](int64_t b0, int64_t b1) {
    std::vector<float> wbuf;
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
  if (pool) pool->parallel_for(blocks, run);
  else run(0, blocks);
}

}  // namespace ballast::kernels::cpu
