#include "ballast/kernels/cpu/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/causal_conv1d.h"
#include "ballast/kernels/cpu/gated_delta_rule.h"
#include "ballast/kernels/cpu/gated_rms_norm.h"
#include "ballast/kernels/cpu/matmul.h"

namespace ballast::kernels {

namespace {
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// Small per-row parameter vectors (norm weights, gates) are stored F32 by the loader; accept any
// dtype here by widening once.
std::vector<float> widen(const Tensor& t) {
  std::vector<float> v(size_t(t.numel()));
  to_f32(t.raw(), t.dtype(), v.data(), v.size());
  return v;
}

int64_t last_dim(const Tensor& t) { return t.dim(-1); }
}  // namespace

CpuOps::CpuOps(ThreadPool* pool) : pool_(pool) {
  // Parallelism comes from our pool; BLAS runs single-threaded inside each task.
  openblas_set_num_threads(1);
}

Tensor CpuOps::alloc(std::vector<int64_t> shape) { return Tensor::zeros(std::move(shape)); }

void CpuOps::embedding(std::span<const int32_t> ids, const Tensor& table, Tensor& out) {
  const int64_t V = table.dim(0), H = table.dim(1);
  check(out.dim(0) == int64_t(ids.size()) && out.dim(1) == H, "embedding: out {} for {} ids of width {}",
        out, ids.size(), H);
  const size_t es = dtype_size(table.dtype());
  for (size_t t = 0; t < ids.size(); ++t) {
    check(ids[t] >= 0 && ids[t] < V, "token id {} out of range [0, {})", ids[t], V);
    to_f32(static_cast<const char*>(table.raw()) + size_t(ids[t]) * H * es, table.dtype(),
           out.f32() + t * H, size_t(H));
  }
}

void CpuOps::matmul(const Tensor& x, const Tensor& w, Tensor& y) { cpu::matmul(x, w, y, pool_); }

void CpuOps::rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) {
  const int64_t D = last_dim(x), R = x.numel() / D;
  check(w.numel() == D && y.numel() == x.numel(), "rms_norm: x{} w{} y{}", x, w,
        y);
  const std::vector<float> wv = widen(w);
  const float* xp = x.f32();
  float* yp = y.f32();
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
      const float inv = 1.0f / std::sqrt(float(ss / D) + eps);
      for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * (1.0f + wv[i]);
    }
  };
  pool_->parallel_for(R, body, 16);
}

void CpuOps::add(Tensor& y, const Tensor& x) {
  check(y.numel() == x.numel(), "add: y{} x{}", y, x);
  float* yp = y.f32();
  const float* xp = x.f32();
  for (int64_t i = 0, n = y.numel(); i < n; ++i) yp[i] += xp[i];
}

void CpuOps::copy(const Tensor& src, Tensor& dst) {
  check(src.numel() == dst.numel() && src.dtype() == dst.dtype(), "copy: src{} dst{}", src,
        dst);
  std::memcpy(dst.raw(), src.raw(), src.nbytes());
}

void CpuOps::concat_cols(const Tensor& a, const Tensor& b, Tensor& out) {
  const int64_t T = a.dim(0), A = a.dim(1), B = b.dim(1);
  check(b.dim(0) == T && out.dim(0) == T && out.dim(1) == A + B, "concat_cols: a{} b{} out{}", a,
        b, out);
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(out.f32() + t * (A + B), a.f32() + t * A, size_t(A) * 4);
    std::memcpy(out.f32() + t * (A + B) + A, b.f32() + t * B, size_t(B) * 4);
  }
}

void CpuOps::silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) {
  check(gate.numel() == up.numel() && out.numel() == gate.numel(), "silu_mul: gate{} up{} out{}",
        gate, up, out);
  const float* g = gate.f32();
  const float* u = up.f32();
  float* o = out.f32();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) o[i] = silu(g[i]) * u[i];
}

void CpuOps::split_heads_gate(const Tensor& qg, Tensor& q, Tensor& gate) {
  const int64_t hd = q.dim(-1), rows = q.numel() / hd;
  check(qg.numel() == 2 * q.numel() && gate.numel() == q.numel(), "split_heads_gate: qg{} q{} gate{}",
        qg, q, gate);
  const float* s = qg.f32();
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(q.f32() + r * hd, s + r * 2 * hd, size_t(hd) * 4);
    std::memcpy(gate.f32() + r * hd, s + r * 2 * hd + hd, size_t(hd) * 4);
  }
}

void CpuOps::rope(Tensor& x, std::span<const int32_t> positions, int rot, double theta) {
  const int64_t T = x.dim(0), heads = x.dim(1), hd = x.dim(2);
  check(int64_t(positions.size()) == T && rot <= hd && rot % 2 == 0, "rope: x{} with {} positions, rot {}",
        x, positions.size(), rot);
  const int half = rot / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) inv_freq[i] = float(1.0 / std::pow(theta, double(2 * i) / rot));
  float* xp = x.f32();
  for (int64_t t = 0; t < T; ++t) {
    for (int i = 0; i < half; ++i) {
      // Same rounding as the reference: angle in fp32, then cos/sin.
      const float ang = float(positions[t]) * inv_freq[i];
      const float c = std::cos(ang), s = std::sin(ang);
      for (int64_t h = 0; h < heads; ++h) {
        float* v = xp + (t * heads + h) * hd;
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

void CpuOps::attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache,
                       Tensor& v_cache, int64_t pos0, Tensor& out) {
  const int64_t T = q.dim(0), Hq = q.dim(1), hd = q.dim(2), Hkv = k_new.dim(1);
  check(Hq % Hkv == 0 && k_cache.dim(0) >= pos0 + T && k_cache.dim(1) == Hkv && k_cache.dim(2) == hd,
        "attention: q{} k_new{} cache{} at position {}", q, k_new, k_cache,
        pos0);
  const size_t row = size_t(Hkv * hd);
  std::memcpy(k_cache.f32() + pos0 * row, k_new.f32(), T * row * 4);
  std::memcpy(v_cache.f32() + pos0 * row, v_new.f32(), T * row * 4);
  const int64_t group = Hq / Hkv;
  const float scale = 1.0f / std::sqrt(float(hd));
  const float* kc = k_cache.f32();
  const float* vc = v_cache.f32();
  auto body = [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(size_t(pos0 + T));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / Hq, h = i % Hq, kvh = h / group, len = pos0 + t + 1;
      const float* qv = q.f32() + (t * Hq + h) * hd;
      float mx = -INFINITY;
      for (int64_t s = 0; s < len; ++s) {
        const float* kv = kc + s * row + kvh * hd;
        float d = 0;
        for (int64_t j = 0; j < hd; ++j) d += qv[j] * kv[j];
        scores[s] = d * scale;
        mx = std::max(mx, scores[s]);
      }
      double sum = 0;
      for (int64_t s = 0; s < len; ++s) sum += (scores[s] = std::exp(scores[s] - mx));
      const float inv = float(1.0 / sum);
      float* o = out.f32() + (t * Hq + h) * hd;
      std::fill(o, o + hd, 0.0f);
      for (int64_t s = 0; s < len; ++s) {
        const float p = scores[s] * inv;
        const float* vv = vc + s * row + kvh * hd;
        for (int64_t j = 0; j < hd; ++j) o[j] += p * vv[j];
      }
    }
  };
  pool_->parallel_for(T * Hq, body, 4);
}

void CpuOps::mul_sigmoid(Tensor& x, const Tensor& gate) {
  check(x.numel() == gate.numel(), "mul_sigmoid: x{} gate{}", x, gate);
  float* xp = x.f32();
  const float* gp = gate.f32();
  for (int64_t i = 0, n = x.numel(); i < n; ++i) xp[i] *= sigmoid(gp[i]);
}

void CpuOps::delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias,
                         Tensor& beta, Tensor& g) {
  const int64_t T = b.dim(0), Hv = b.dim(1);
  const std::vector<float> al = widen(A_log), dt = widen(dt_bias);
  check(int64_t(al.size()) == Hv && int64_t(dt.size()) == Hv, "delta_gates: A_log/dt_bias size != {}", Hv);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hv; ++h) {
      beta.f32()[t * Hv + h] = sigmoid(b.f32()[t * Hv + h]);
      g.f32()[t * Hv + h] = -std::exp(al[h]) * softplus(a.f32()[t * Hv + h] + dt[h]);
    }
}

void CpuOps::causal_conv1d_silu(const Tensor& x, const Tensor& weight, Tensor& state, Tensor& out) {
  const int T = int(x.dim(0)), C = int(x.dim(1)), kc = int(weight.dim(1));
  check(weight.dim(0) == C && state.dim(0) == C && state.dim(1) == kc - 1, "conv1d: x{} w{} state{}",
        x, weight, state);
  cpu::causal_conv1d_silu(x.f32(), C, T, C, weight.f32(), kc, state.f32(), out.f32(), C, pool_);
}

void CpuOps::gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta, const DeltaRuleDims& d,
                              Tensor& state, Tensor& out, bool chunked) {
  const int T = int(qkv.dim(0));
  const int64_t ld = qkv.dim(1), kd = int64_t(d.Hk) * d.dk;
  check(ld == 2 * kd + int64_t(d.Hv) * d.dv, "gated_delta_rule: qkv{} for Hk={} dk={} Hv={} dv={}",
        qkv, d.Hk, d.dk, d.Hv, d.dv);
  const cpu::DeltaRuleShape s{T, d.Hk, d.Hv, d.dk, d.dv};
  const float* base = qkv.f32();
  const int64_t ldo = int64_t(d.Hv) * d.dv;
  if (chunked)
    cpu::gated_delta_rule_chunked(s, base, ld, base + kd, ld, base + 2 * kd, ld, g.f32(), beta.f32(),
                                  state.f32(), out.f32(), ldo, pool_);
  else
    cpu::gated_delta_rule_recurrent(s, base, ld, base + kd, ld, base + 2 * kd, ld, g.f32(), beta.f32(),
                                    state.f32(), out.f32(), ldo, pool_);
}

void CpuOps::gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, float eps, Tensor& y) {
  const int dv = int(w.numel());
  cpu::gated_rms_norm(x.f32(), z.f32(), x.numel() / dv, dv, w.f32(), eps, y.f32());
}

void CpuOps::scale_rows_sigmoid(Tensor& y, const Tensor& s) {
  const int64_t T = y.dim(0), D = y.numel() / std::max<int64_t>(1, T);
  check(s.numel() == T, "scale_rows_sigmoid: y{} s{}", y, s);
  for (int64_t t = 0; t < T; ++t) {
    const float f = sigmoid(s.f32()[t]);
    for (int64_t i = 0; i < D; ++i) y.f32()[t * D + i] *= f;
  }
}

void CpuOps::gather_rows(const Tensor& x, std::span<const int32_t> rows, Tensor& out) {
  const int64_t D = x.dim(1);
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(out.f32() + i * D, x.f32() + int64_t(rows[i]) * D, size_t(D) * 4);
}

void CpuOps::scatter_add_rows(const Tensor& x, std::span<const int32_t> rows, std::span<const float> scale,
                              Tensor& y) {
  const int64_t D = y.dim(1);
  for (size_t i = 0; i < rows.size(); ++i) {
    float* yr = y.f32() + int64_t(rows[i]) * D;
    const float* xr = x.f32() + i * D;
    for (int64_t j = 0; j < D; ++j) yr[j] += scale[i] * xr[j];
  }
}

void CpuOps::to_host(const Tensor& x, float* dst) { std::memcpy(dst, x.f32(), x.nbytes()); }

}  // namespace ballast::kernels
