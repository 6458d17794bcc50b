// CpuOps: construction, scratch, and the row, elementwise, norm and rope ops.
#include "ballast/kernels/cpu/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/gated_rms_norm.h"
#include "ballast/kernels/cpu/matmul.h"
#include "ballast/kernels/cpu/op_support.h"
#include "ballast/kernels/op_checks.h"
#include "ballast/kernels/random_fill.h"

namespace ballast::kernels {

using namespace cpu;

float* CpuScratch::floats(size_t n) {
  if (n > size_) {
    data_.reset();  // the old contents are not kept: give the memory back first
    data_ = std::make_unique_for_overwrite<float[]>(n);
    size_ = n;
    ++counters_.allocations;
    counters_.bytes_allocated += int64_t(n * sizeof(float));
  }
  return data_.get();
}

CpuOps::CpuOps(ThreadPool& pool, Counters& counters)
    : pool_(pool),
      attention_scratch_(counters),
      expert_scratch_(counters),
      sampling_scratch_(counters),
      rows_scratch_(counters) {}

namespace {
// Elementwise loops below this many elements run on the calling thread.
constexpr int64_t kElementGrain = int64_t(1) << 14;

// y = x / rms(x) * (1 + w) over one row of D (the mean of squares in double): rms_norm's rows and
// qk_norm_rope's heads.
void rms_norm_row(const float* x, const float* w, int64_t D, float eps, float* y) {
  double ss = 0;
  for (int64_t i = 0; i < D; ++i) ss += double(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(float(ss / double(D)) + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = x[i] * inv * (1.0f + w[i]);
}
}  // namespace

void CpuOps::embedding(const Tensor& ids, const Tensor& table, Tensor& out) {
  auto timed = time_op("embedding");
  const auto [T, V, H] = check_embedding(ids, table, out);
  const int32_t* id = i32(ids);
  for (int64_t t = 0; t < T; ++t) check(id[t] >= 0 && id[t] < V, "embedding: token id {} out of range [0, {})", id[t], V);
  const size_t row = size_t(H) * dtype_size(table.dtype());
  parallel(&pool_, T, 16, [&, H = H](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      to_f32(static_cast<const char*>(table.raw()) + size_t(id[t]) * row, table.dtype(), f32_mut(out) + t * H,
             size_t(H));
  });
}

void CpuOps::matmul(const Tensor& x, const Tensor& w, Tensor& y) {
  auto timed = time_op("matmul");
  const auto [T, K, N] = check_matmul(x, w, y);
  cpu::matmul(f32(x), T, K, w, f32_mut(y), &pool_, weights_stream_);
}

void CpuOps::rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) {
  auto timed = time_op("rms_norm");
  const auto [R, D] = check_rms_norm(x, w, y);
  thread_local std::vector<float> wtmp;
  const float* wv = as_f32(w, wtmp);
  const float* xp = f32(x);
  float* yp = f32_mut(y);
  parallel(&pool_, R, 16, [&, D = D](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(xp + r * D, wv, D, eps, yp + r * D);
  });
}

void CpuOps::matmul_many(const Tensor& x, std::span<const Tensor> w, std::span<Tensor> y) {
  check_matmul_many(w, y);
  for (size_t i = 0; i < w.size(); ++i) matmul(x, w[i], y[i]);
}

void CpuOps::add_rms_norm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& y) {
  check_add_rms_norm(x, d, w, y);
  add(x, d);
  rms_norm(x, w, eps, y);
}

void CpuOps::add(Tensor& y, const Tensor& x) {
  auto timed = time_op("add");
  check_add(y, x);
  float* yp = f32_mut(y);
  const float* xp = f32(x);
  parallel(&pool_, y.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) yp[i] += xp[i];
  });
}

void CpuOps::copy(const Tensor& src, Tensor& dst) {
  auto timed = time_op("copy");
  check_copy(src, dst);
  if (src.nbytes() > 0 && src.raw() != dst.raw()) std::memmove(dst.raw(), src.raw(), src.nbytes());
}

void CpuOps::zero(Tensor& t) {
  auto timed = time_op("zero");
  if (t.nbytes() > 0) std::memset(t.raw(), 0, t.nbytes());
}

void CpuOps::fill_uniform(Tensor& t, uint64_t seed, float scale) {
  auto timed = time_op("fill_uniform");
  check_fill_uniform(t, scale);
  const DType dt = t.dtype();
  parallel(&pool_, t.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float v = uniform_weight(seed, uint64_t(i), scale);
      if (dt == DType::F32) t.f32()[i] = v;
      else if (dt == DType::BF16) static_cast<uint16_t*>(t.raw())[i] = f32_to_bf16(v);
      else if (dt == DType::F8_E4M3) static_cast<uint8_t*>(t.raw())[i] = f32_to_e4m3(v);
      else static_cast<uint16_t*>(t.raw())[i] = f32_to_f16(v);
    }
  });
}

void CpuOps::concat_cols(const Tensor& a, const Tensor& b, Tensor& out) {
  auto timed = time_op("concat_cols");
  const auto [T, A, B] = check_concat_cols(a, b, out);
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(f32_mut(out) + t * (A + B), f32(a) + t * A, size_t(A) * 4);
    std::memcpy(f32_mut(out) + t * (A + B) + A, f32(b) + t * B, size_t(B) * 4);
  }
}

void CpuOps::silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) {
  auto timed = time_op("silu_mul");
  check_silu_mul(gate, up, out);
  const float* g = f32(gate);
  const float* u = f32(up);
  float* o = f32_mut(out);
  parallel(&pool_, out.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = silu(g[i]) * u[i];
  });
}

void CpuOps::mul_sigmoid(Tensor& x, const Tensor& gate) {
  auto timed = time_op("mul_sigmoid");
  check_mul_sigmoid(x, gate);
  float* xp = f32_mut(x);
  const float* gp = f32(gate);
  parallel(&pool_, x.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) xp[i] *= sigmoid(gp[i]);
  });
}

void CpuOps::scale_rows_sigmoid(Tensor& y, const Tensor& s) {
  auto timed = time_op("scale_rows_sigmoid");
  const auto [T, D] = check_scale_rows_sigmoid(y, s);
  float* yp = f32_mut(y);
  for (int64_t t = 0; t < T; ++t) {
    const float f = sigmoid(f32(s)[t]);
    for (int64_t i = 0; i < D; ++i) yp[t * D + i] *= f;
  }
}

void CpuOps::swiglu_down(Tensor& gate, const Tensor& up, const Tensor& w, const Tensor& row_gate, Tensor& out) {
  check_swiglu_down(gate, up, w, row_gate, out);
  silu_mul(gate, up, gate);
  matmul(gate, w, out);
  if (row_gate.defined()) scale_rows_sigmoid(out, row_gate);
}

void CpuOps::gather_rows(const Tensor& x, const Tensor& rows, int row_div, Tensor& out) {
  auto timed = time_op("gather_rows");
  const auto [N, M, row] = check_gather_rows(x, rows, row_div, out);
  const int32_t* r = i32(rows);
  for (int64_t i = 0; i < N; ++i)
    check(r[i] / row_div < M, "gather_rows: row {} / {} out of range for x {}", r[i], row_div, x);
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
  const int64_t grain = int64_t(1 + (size_t(kElementGrain) * 4) / std::max<size_t>(row, 1));
  parallel(&pool_, N, grain, [&, row = row](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (r[i] < 0) std::memset(dst + size_t(i) * row, 0, row);
      else std::memcpy(dst + size_t(i) * row, src + size_t(r[i] / row_div) * row, row);
    }
  });
}

void CpuOps::scatter_rows(const Tensor& x, const Tensor& rows, Tensor& out) {
  auto timed = time_op("scatter_rows");
  const auto [N, M, row] = check_scatter_rows(x, rows, out);
  const int32_t* r = i32(rows);
  for (int64_t i = 0; i < N; ++i)
    check(r[i] >= 0 && r[i] < M, "scatter_rows: rows[{}] = {} not in [0, {})", i, r[i], M);
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
  // Rows do not repeat, so the writes are disjoint.
  const int64_t grain = int64_t(1 + (size_t(kElementGrain) * 4) / std::max<size_t>(row, 1));
  parallel(&pool_, N, grain, [&, row = row](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(dst + size_t(r[i]) * row, src + size_t(i) * row, row);
  });
}

void CpuOps::qk_norm_rope(const Tensor& qg, const Tensor& q_norm, const Tensor& k_norm, float eps,
                          const Tensor& positions, int rot, double theta, Tensor& q, Tensor& gate, Tensor& k) {
  auto timed = time_op("qk_norm_rope");
  const auto [T, Hq, Hkv, hd] = check_qk_norm_rope(qg, q_norm, k_norm, positions, rot, q, gate, k);
  thread_local std::vector<float> inv_freq, qw, kw;
  const int half = rot / 2;
  inv_freq.resize(size_t(half));
  for (int i = 0; i < half; ++i) inv_freq[size_t(i)] = float(1.0 / std::pow(theta, double(2 * i) / rot));
  const float *qwv = as_f32(q_norm, qw), *kwv = as_f32(k_norm, kw), *freq = inv_freq.data();
  const int32_t* pos = i32(positions);
  const float* qgp = f32(qg);
  float *qp = f32_mut(q), *gp = f32_mut(gate), *kp = f32_mut(k);
  parallel(&pool_, T, 4, [&, Hq = Hq, Hkv = Hkv, hd = hd](int64_t t0, int64_t t1) {
    thread_local std::vector<float> cs;  // row t's cos and sin, the angle in fp32 as the reference has it
    cs.resize(2 * size_t(half));
    // One head's row: rms_norm's, then the rotation.
    auto head = [&](const float* x, const float* w, float* y) {
      rms_norm_row(x, w, hd, eps, y);
      for (int i = 0; i < half; ++i) {
        const float c = cs[size_t(i)], s = cs[size_t(half + i)], a = y[i], b = y[i + half];
        y[i] = a * c - b * s;
        y[i + half] = b * c + a * s;
      }
    };
    for (int64_t t = t0; t < t1; ++t) {
      for (int i = 0; i < half; ++i) {
        const float ang = float(pos[t]) * freq[i];
        cs[size_t(i)] = std::cos(ang), cs[size_t(half + i)] = std::sin(ang);
      }
      for (int64_t h = 0; h < Hq; ++h) {
        const float* src = qgp + (t * Hq + h) * 2 * hd;
        std::memcpy(gp + (t * Hq + h) * hd, src + hd, size_t(hd) * 4);
        head(src, qwv, qp + (t * Hq + h) * hd);
      }
      for (int64_t h = 0; h < Hkv; ++h) head(kp + (t * Hkv + h) * hd, kwv, kp + (t * Hkv + h) * hd);
    }
  });
}

void CpuOps::delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias, Tensor& beta,
                         Tensor& g) {
  auto timed = time_op("delta_gates");
  const auto [T, Hv] = check_delta_gates(b, a, A_log, dt_bias, beta, g);
  thread_local std::vector<float> al_tmp, dt_tmp;
  const float* al = as_f32(A_log, al_tmp);
  const float* dt = as_f32(dt_bias, dt_tmp);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hv; ++h) {
      f32_mut(beta)[t * Hv + h] = sigmoid(f32(b)[t * Hv + h]);
      f32_mut(g)[t * Hv + h] = -std::exp(al[h]) * softplus(f32(a)[t * Hv + h] + dt[h]);
    }
}

void CpuOps::gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, float eps, Tensor& y) {
  auto timed = time_op("gated_rms_norm");
  const auto [rows, dv] = check_gated_rms_norm(x, z, w, y);
  thread_local std::vector<float> wtmp;
  const float* wv = as_f32(w, wtmp);
  parallel(&pool_, rows, 64, [&, dv = dv](int64_t r0, int64_t r1) {
    cpu::gated_rms_norm(f32(x) + r0 * dv, f32(z) + r0 * dv, r1 - r0, int(dv), wv, eps, f32_mut(y) + r0 * dv);
  });
}

}  // namespace ballast::kernels
