#pragma once
// Helpers shared by the CPU ops (internal to ballast_kernels_cpu): loops over the pool that
// neither allocate nor share scratch between threads, and small math. The ops' argument checks
// are the contract's (kernels/op_checks.h); the CPU adds those of the index data it reads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ballast/core/tensor.h"
#include "ballast/core/thread_pool.h"

namespace ballast::kernels::cpu {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// fn(begin, end) over chunks of [0, n) on the pool (or inline when pool is null). The lambda is
// handed to the pool by one reference, which std::function keeps without allocating.
template <typename Fn>
void parallel(ThreadPool* pool, int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  if (!pool) return fn(int64_t(0), n);
  pool->parallel_for(n, [&fn](int64_t b, int64_t e) { fn(b, e); }, grain);
}

// fn(worker, begin, end) over chunks of at most `grain` items of [0, n), taken in order by up to
// pool->size() threads. A worker index is held by one thread at a time, so it may own a slice
// of scratch (worker < workers(pool, n, grain)).
inline int workers(ThreadPool* pool, int64_t n, int64_t grain) {
  const int64_t chunks = (n + grain - 1) / grain;
  return int(std::clamp<int64_t>(chunks, 1, pool ? pool->size() : 1));
}
template <typename Fn>
void parallel_workers(ThreadPool* pool, int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  const int w = workers(pool, n, grain);
  if (w <= 1) return fn(0, int64_t(0), n);
  const int64_t chunks = (n + grain - 1) / grain;
  std::atomic<int64_t> next{0};
  auto body = [&](int64_t w0, int64_t w1) {
    for (int64_t worker = w0; worker < w1; ++worker)
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
        fn(int(worker), c * grain, std::min(n, (c + 1) * grain));
  };
  // w <= pool size, so the pool makes one chunk per worker index.
  pool->parallel_for(w, [&body](int64_t b, int64_t e) { body(b, e); }, 1);
}

// A parameter vector as fp32: in place when it is F32 (as the loader stores them), else widened
// into `tmp`.
inline const float* as_f32(const Tensor& t, std::vector<float>& tmp) {
  if (t.dtype() == DType::F32) return static_cast<const float*>(t.raw());
  tmp.resize(size_t(t.numel()));
  to_f32(t.raw(), t.dtype(), tmp.data(), tmp.size());
  return tmp.data();
}

inline const int32_t* i32(const Tensor& t) { return static_cast<const int32_t*>(t.raw()); }
inline int32_t* i32_mut(const Tensor& t) { return static_cast<int32_t*>(t.raw()); }
inline const float* f32(const Tensor& t) { return static_cast<const float*>(t.raw()); }
inline float* f32_mut(const Tensor& t) { return static_cast<float*>(t.raw()); }

}  // namespace ballast::kernels::cpu
