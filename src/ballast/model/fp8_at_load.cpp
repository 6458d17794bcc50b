#include "ballast/model/fp8_at_load.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "ballast/core/error.h"

namespace ballast::model {

Tensor quantize_fp8_blocks(const Tensor& w) {
  check(w.rank() == 2 && w.device() == Device::CPU &&
            (w.dtype() == DType::BF16 || w.dtype() == DType::F16 || w.dtype() == DType::F32),
        "quantize to FP8: weight {} must be a host matrix of BF16, F16 or F32", w);
  const int64_t N = w.dim(0), K = w.dim(1), NB = scale_blocks(N), KB = scale_blocks(K);
  Tensor q = Tensor::zeros({N, K}, DType::F8_E4M3), s = Tensor::zeros({NB, KB}, DType::F32);
  uint8_t* qp = static_cast<uint8_t*>(q.raw());
  float* sp = static_cast<float*>(s.raw());
  const char* src = static_cast<const char*>(w.raw());
  const size_t esize = dtype_size(w.dtype());
  std::vector<float> rows(size_t(kScaleBlock * K));  // one row block widened
  for (int64_t nb = 0; nb < NB; ++nb) {
    const int64_t n0 = nb * kScaleBlock, n1 = std::min(N, n0 + kScaleBlock);
    to_f32(src + size_t(n0 * K) * esize, w.dtype(), rows.data(), size_t((n1 - n0) * K));
    for (int64_t kb = 0; kb < KB; ++kb) {
      const int64_t k0 = kb * kScaleBlock, k1 = std::min(K, k0 + kScaleBlock);
      float amax = 0.0f;
      bool finite = true;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = k0; k < k1; ++k) {
          const float v = rows[size_t((n - n0) * K + k)];
          finite = finite && std::isfinite(v);
          amax = std::max(amax, std::fabs(v));
        }
      check(finite, "quantize to FP8: weight {} has a value that is not finite in block ({}, {})", w, nb, kb);
      const float scale = amax > 0.0f ? amax / kE4m3Max : 1.0f;
      sp[nb * KB + kb] = scale;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = k0; k < k1; ++k) qp[n * K + k] = f32_to_e4m3(rows[size_t((n - n0) * K + k)] / scale);
    }
  }
  return Tensor::block_scaled(q, s);
}

Fp8AtLoad quantize_linear_fp8(ModelWeights& w) {
  std::vector<Tensor*> todo;
  const auto add = [&todo](Tensor& t) {
    if (t.defined() && t.dtype() != DType::F8_E4M3_B128) todo.push_back(&t);
  };
  const auto swiglu = [&](kernels::SwigluWeights& e) {
    for (Tensor* t : {&e.gate, &e.up, &e.down}) add(*t);
  };
  const auto layer = [&](LayerWeights& l) {
    for (Tensor* t : {&l.attn.q_proj, &l.attn.k_proj, &l.attn.v_proj, &l.attn.o_proj, &l.delta.in_qkv, &l.delta.in_z,
                      &l.delta.out_proj})
      add(*t);
    for (auto& e : l.moe.experts) swiglu(e);
    if (l.moe.shared) swiglu(*l.moe.shared);
    swiglu(l.dense);
  };
  for (auto& l : w.layers) layer(l);
  if (w.mtp)
    for (auto& l : w.mtp->layers) layer(l);
  Fp8AtLoad r;
  r.tensors = int64_t(todo.size());
  for (const Tensor* t : todo) r.bytes_before += int64_t(t->nbytes());
  // Tensors are independent: the host's cores take them in turn (each result is the same whichever
  // thread makes it). The first error is rethrown once every thread has stopped.
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  const auto work = [&] {
    for (size_t i; (i = next++) < todo.size();) {
      try {
        *todo[i] = quantize_fp8_blocks(*todo[i]);
      } catch (...) {
        std::lock_guard lk(error_mu);
        if (!error) error = std::current_exception();
        next = todo.size();
      }
    }
  };
  const size_t threads = std::clamp<size_t>(std::thread::hardware_concurrency(), 1, std::max<size_t>(1, todo.size()));
  std::vector<std::thread> pool;
  for (size_t i = 1; i < threads; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  for (const Tensor* t : todo) r.bytes_after += int64_t(t->storage_bytes());
  return r;
}

}  // namespace ballast::model
