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
    : pool_(pool), attention_scratch_(counters), expert_scratch_(counters), sampling_scratch_(counters) {}

namespace {
// Elementwise loops below this many elements run on the calling thread.
constexpr int64_t kElementGrain = int64_t(1) << 14;
}  // namespace

void CpuOps::embedding(const Tensor& ids, const Tensor& table, Tensor& out) {
  const int64_t T = ids.numel();
  expect("embedding", "ids", ids, DType::I32);
  check(table.rank() == 2, "embedding: table {} is not [V, H]", table);
  const int64_t V = table.dim(0), H = table.dim(1);
  expect("embedding", "out", out, DType::F32, T * H);
  check(out.rank() == 2 && out.dim(0) == T, "embedding: out {} for {} ids of width {}", out, T, H);
  const int32_t* id = i32(ids);
  for (int64_t t = 0; t < T; ++t) check(id[t] >= 0 && id[t] < V, "embedding: token id {} out of range [0, {})", id[t], V);
  const size_t row = size_t(H) * dtype_size(table.dtype());
  parallel(&pool_, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      to_f32(static_cast<const char*>(table.raw()) + size_t(id[t]) * row, table.dtype(), f32_mut(out) + t * H,
             size_t(H));
  });
}

void CpuOps::matmul(const Tensor& x, const Tensor& w, Tensor& y) { cpu::matmul(x, w, y, &pool_); }

void CpuOps::rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) {
  check(x.rank() >= 1, "rms_norm: x {} has no dimensions", x);
  const int64_t D = x.dim(-1), R = D > 0 ? x.numel() / D : 0;
  check(w.numel() == D && y.numel() == x.numel() && x.dtype() == DType::F32 && y.dtype() == DType::F32,
        "rms_norm: x{} w{} y{}", x, w, y);
  thread_local std::vector<float> wtmp;
  const float* wv = as_f32(w, wtmp);
  const float* xp = f32(x);
  float* yp = f32_mut(y);
  parallel(&pool_, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
      const float inv = 1.0f / std::sqrt(float(ss / D) + eps);
      for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * (1.0f + wv[i]);
    }
  });
}

void CpuOps::add(Tensor& y, const Tensor& x) {
  check(y.numel() == x.numel() && y.dtype() == DType::F32 && x.dtype() == DType::F32, "add: y{} x{}", y, x);
  float* yp = f32_mut(y);
  const float* xp = f32(x);
  parallel(&pool_, y.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) yp[i] += xp[i];
  });
}

void CpuOps::copy(const Tensor& src, Tensor& dst) {
  check(src.nbytes() == dst.nbytes(), "copy: src {} {} and dst {} {} differ in size", src, dtype_name(src.dtype()),
        dst, dtype_name(dst.dtype()));
  if (src.nbytes() > 0 && src.raw() != dst.raw()) std::memmove(dst.raw(), src.raw(), src.nbytes());
}

void CpuOps::zero(Tensor& t) {
  if (t.nbytes() > 0) std::memset(t.raw(), 0, t.nbytes());
}

void CpuOps::concat_cols(const Tensor& a, const Tensor& b, Tensor& out) {
  check(a.rank() == 2 && b.rank() == 2 && out.rank() == 2, "concat_cols: a{} b{} out{} must be 2-d", a, b, out);
  const int64_t T = a.dim(0), A = a.dim(1), B = b.dim(1);
  check(b.dim(0) == T && out.dim(0) == T && out.dim(1) == A + B && a.dtype() == DType::F32 &&
            b.dtype() == DType::F32 && out.dtype() == DType::F32,
        "concat_cols: a{} b{} out{}", a, b, out);
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(f32_mut(out) + t * (A + B), f32(a) + t * A, size_t(A) * 4);
    std::memcpy(f32_mut(out) + t * (A + B) + A, f32(b) + t * B, size_t(B) * 4);
  }
}

void CpuOps::silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) {
  check(gate.numel() == up.numel() && out.numel() == gate.numel() && gate.dtype() == DType::F32 &&
            up.dtype() == DType::F32 && out.dtype() == DType::F32,
        "silu_mul: gate{} up{} out{}", gate, up, out);
  const float* g = f32(gate);
  const float* u = f32(up);
  float* o = f32_mut(out);
  parallel(&pool_, out.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = silu(g[i]) * u[i];
  });
}

void CpuOps::mul_sigmoid(Tensor& x, const Tensor& gate) {
  check(x.numel() == gate.numel() && x.dtype() == DType::F32 && gate.dtype() == DType::F32,
        "mul_sigmoid: x{} gate{}", x, gate);
  float* xp = f32_mut(x);
  const float* gp = f32(gate);
  parallel(&pool_, x.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) xp[i] *= sigmoid(gp[i]);
  });
}

void CpuOps::scale_rows_sigmoid(Tensor& y, const Tensor& s) {
  check(y.rank() >= 1 && y.dtype() == DType::F32, "scale_rows_sigmoid: y {} must be F32 rows", y);
  const int64_t T = y.dim(0), D = T > 0 ? y.numel() / T : 0;
  expect("scale_rows_sigmoid", "s", s, DType::F32, T);
  float* yp = f32_mut(y);
  for (int64_t t = 0; t < T; ++t) {
    const float f = sigmoid(f32(s)[t]);
    for (int64_t i = 0; i < D; ++i) yp[t * D + i] *= f;
  }
}

void CpuOps::gather_rows(const Tensor& x, const Tensor& rows, int row_div, Tensor& out) {
  expect("gather_rows", "rows", rows, DType::I32);
  check(row_div >= 1, "gather_rows: row_div {} < 1", row_div);
  check(x.rank() >= 1 && out.rank() >= 1 && x.dtype() == out.dtype(), "gather_rows: x{} {} out{} {}", x,
        dtype_name(x.dtype()), out, dtype_name(out.dtype()));
  const int64_t N = rows.numel(), M = x.dim(0);
  const size_t row = M > 0 ? x.nbytes() / size_t(M) : 0;
  check(out.dim(0) == N && out.nbytes() == size_t(N) * row, "gather_rows: out {} for {} rows of x {}", out, N, x);
  const int32_t* r = i32(rows);
  for (int64_t i = 0; i < N; ++i)
    check(r[i] >= 0 && r[i] / row_div < M, "gather_rows: row {} / {} out of range for x {}", r[i], row_div, x);
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
  parallel(&pool_, N, int64_t(1 + (size_t(kElementGrain) * 4) / std::max<size_t>(row, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(dst + size_t(i) * row, src + size_t(r[i] / row_div) * row, row);
  });
}

void CpuOps::scatter_rows(const Tensor& x, const Tensor& rows, Tensor& out) {
  expect("scatter_rows", "rows", rows, DType::I32);
  check(x.rank() >= 1 && out.rank() >= 1 && x.dtype() == out.dtype(), "scatter_rows: x{} {} out{} {}", x,
        dtype_name(x.dtype()), out, dtype_name(out.dtype()));
  const int64_t N = rows.numel(), M = out.dim(0);
  const size_t row = M > 0 ? out.nbytes() / size_t(M) : 0;
  check(x.dim(0) == N && x.nbytes() == size_t(N) * row, "scatter_rows: x {} for {} rows of out {}", x, N, out);
  const int32_t* r = i32(rows);
  for (int64_t i = 0; i < N; ++i)
    check(r[i] >= 0 && r[i] < M, "scatter_rows: rows[{}] = {} not in [0, {})", i, r[i], M);
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
  // Rows do not repeat, so the writes are disjoint.
  parallel(&pool_, N, int64_t(1 + (size_t(kElementGrain) * 4) / std::max<size_t>(row, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(dst + size_t(r[i]) * row, src + size_t(i) * row, row);
  });
}

void CpuOps::split_heads_gate(const Tensor& qg, Tensor& q, Tensor& gate) {
  check(q.rank() >= 1 && q.dim(-1) > 0, "split_heads_gate: q {} has no head dimension", q);
  const int64_t hd = q.dim(-1), rows = q.numel() / hd;
  check(qg.numel() == 2 * q.numel() && gate.numel() == q.numel() && qg.dtype() == DType::F32 &&
            q.dtype() == DType::F32 && gate.dtype() == DType::F32,
        "split_heads_gate: qg{} q{} gate{}", qg, q, gate);
  const float* s = f32(qg);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(f32_mut(q) + r * hd, s + r * 2 * hd, size_t(hd) * 4);
    std::memcpy(f32_mut(gate) + r * hd, s + r * 2 * hd + hd, size_t(hd) * 4);
  }
}

void CpuOps::rope(Tensor& x, const Tensor& positions, int rot, double theta) {
  check(x.rank() == 3 && x.dtype() == DType::F32, "rope: x {} is not F32 [T, heads, hd]", x);
  const int64_t T = x.dim(0), heads = x.dim(1), hd = x.dim(2);
  expect("rope", "positions", positions, DType::I32, T);
  check(rot <= hd && rot >= 0 && rot % 2 == 0, "rope: x{} with rot {}", x, rot);
  const int half = rot / 2;
  thread_local std::vector<float> inv_freq;
  inv_freq.resize(size_t(half));
  for (int i = 0; i < half; ++i) inv_freq[size_t(i)] = float(1.0 / std::pow(theta, double(2 * i) / rot));
  const int32_t* pos = i32(positions);
  float* xp = f32_mut(x);
  const float* freq = inv_freq.data();
  parallel(&pool_, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int i = 0; i < half; ++i) {
        // Same rounding as the reference: angle in fp32, then cos/sin.
        const float ang = float(pos[t]) * freq[i];
        const float c = std::cos(ang), s = std::sin(ang);
        for (int64_t h = 0; h < heads; ++h) {
          float* v = xp + (t * heads + h) * hd;
          const float a = v[i], b = v[i + half];
          v[i] = a * c - b * s;
          v[i + half] = b * c + a * s;
        }
      }
    }
  });
}

void CpuOps::delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias, Tensor& beta,
                         Tensor& g) {
  check(b.rank() == 2 && b.dtype() == DType::F32, "delta_gates: b {} is not F32 [T, Hv]", b);
  const int64_t T = b.dim(0), Hv = b.dim(1);
  check(a.numel() == T * Hv && beta.numel() == T * Hv && g.numel() == T * Hv && a.dtype() == DType::F32 &&
            beta.dtype() == DType::F32 && g.dtype() == DType::F32,
        "delta_gates: b{} a{} beta{} g{}", b, a, beta, g);
  check(A_log.numel() == Hv && dt_bias.numel() == Hv, "delta_gates: A_log{} dt_bias{} for {} heads", A_log, dt_bias, Hv);
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
  const int64_t dv = w.numel();
  check(dv > 0 && x.numel() % dv == 0 && z.numel() == x.numel() && y.numel() == x.numel() &&
            x.dtype() == DType::F32 && z.dtype() == DType::F32 && y.dtype() == DType::F32,
        "gated_rms_norm: x{} z{} w{} y{}", x, z, w, y);
  thread_local std::vector<float> wtmp;
  const float* wv = as_f32(w, wtmp);
  const int64_t rows = x.numel() / dv;
  parallel(&pool_, rows, 64, [&](int64_t r0, int64_t r1) {
    cpu::gated_rms_norm(f32(x) + r0 * dv, f32(z) + r0 * dv, r1 - r0, int(dv), wv, eps, f32_mut(y) + r0 * dv);
  });
}

}  // namespace ballast::kernels
