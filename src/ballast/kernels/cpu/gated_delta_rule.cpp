#include "ballast/kernels/cpu/gated_delta_rule.h"

// Two forms of one function (see the header):
//
// Recurrent: per value head, per step, two sweeps over the dk x dv state (decay + S^T k, then the
// rank-1 update fused with S^T q).
//
// Chunked (WY / UT transform), per value head and chunk of L steps with incoming state S0. With
// gc_i = g_0 + ... + g_i (cumulative log-decay inside the chunk), D_ij = exp(gc_i - gc_j) for j <= i,
// and the deltas u_j = beta_j (v_j - S_{j-1}'^T k_j) (S' = the state after the decay of step j):
//   (I + A) U = diag(beta) V - diag(beta e^gc) K S0,   A_jm = beta_j D_jm (k_j . k_m), m < j
// so with Tinv = (I + A)^-1 (unit lower triangular, by forward substitution):
//   W = Tinv diag(beta e^gc) K,  U = Tinv diag(beta) V - W S0
//   O = diag(e^gc) Q S0 + (D o tril(Q K^T)) U
//   S_L = e^{gc_last} S0 + (diag(e^{gc_last - gc}) K)^T U
// Every product is a small dense GEMM, done by one register-blocked kernel below.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/core/thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "ballast/kernels/cpu/multiversion.h"
#define BALLAST_INLINE inline __attribute__((always_inline))

// The 8-wide vector helpers are always inlined; their by-value ABI never crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ballast::kernels::cpu {

namespace {

constexpr float kL2Eps = 1e-6f;  // transformers l2norm (qwen3_next): x * rsqrt(sum(x^2) + 1e-6)

typedef float v8 __attribute__((vector_size(32)));

BALLAST_INLINE v8 load8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
BALLAST_INLINE void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// C[MR x 8*NV] (=|+=) alpha * A[MR x K] B[K x 8*NV]; row-major, leading dimensions in floats.
template <int MR, int NV>
BALLAST_INLINE void micro(int K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                          int64_t ldc, bool acc) {
  v8 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = v8{};
  for (int k = 0; k < K; ++k) {
    v8 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load8(B + int64_t(k) * ldb + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const float a = A[int64_t(r) * lda + k];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* p = C + int64_t(r) * ldc + 8 * v;
      store8(p, acc ? load8(p) + alpha * c[r][v] : alpha * c[r][v]);
    }
}

template <int MR>
BALLAST_INLINE void row_block(int N, int K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
                              float* C, int64_t ldc, bool acc) {
  int j = 0;
  for (; j + 16 <= N; j += 16) micro<MR, 2>(K, alpha, A, lda, B + j, ldb, C + j, ldc, acc);
  for (; j + 8 <= N; j += 8) micro<MR, 1>(K, alpha, A, lda, B + j, ldb, C + j, ldc, acc);
  for (; j < N; ++j)
    for (int r = 0; r < MR; ++r) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s += A[int64_t(r) * lda + k] * B[int64_t(k) * ldb + j];
      float* p = C + int64_t(r) * ldc + j;
      *p = acc ? *p + alpha * s : alpha * s;
    }
}

// C[M x N] (=|+=) alpha * A[M x K] B[K x N], row-major.
// lower_a: A is lower triangular with explicit zeros above the diagonal (rows i use k <= i only).
// lower_c: only C's lower triangle (j <= i) is wanted; entries above it may be left unwritten.
constexpr int kMR = 6;
BALLAST_MV void gemm(int M, int N, int K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc, bool acc, bool lower_a = false, bool lower_c = false) {
  for (int i = 0; i < M; i += kMR) {
    const int mr = std::min(kMR, M - i);
    const int k_end = lower_a ? std::min(K, i + mr) : K;
    const int n_end = lower_c ? std::min(N, (i + mr + 7) / 8 * 8) : N;
    const float* a = A + int64_t(i) * lda;
    float* c = C + int64_t(i) * ldc;
    switch (mr) {
      case 6: row_block<6>(n_end, k_end, alpha, a, lda, B, ldb, c, ldc, acc); break;
      case 5: row_block<5>(n_end, k_end, alpha, a, lda, B, ldb, c, ldc, acc); break;
      case 4: row_block<4>(n_end, k_end, alpha, a, lda, B, ldb, c, ldc, acc); break;
      case 3: row_block<3>(n_end, k_end, alpha, a, lda, B, ldb, c, ldc, acc); break;
      case 2: row_block<2>(n_end, k_end, alpha, a, lda, B, ldb, c, ldc, acc); break;
      default: row_block<1>(n_end, k_end, alpha, a, lda, B, ldb, c, ldc, acc); break;
    }
  }
}

// dst = src * (1 / sqrt(sum src^2 + eps)) * scale
BALLAST_INLINE void l2norm_scaled(const float* src, int n, float scale, float* dst) {
  float ss = 0.f;
  for (int i = 0; i < n; ++i) ss += src[i] * src[i];
  const float f = scale / std::sqrt(ss + kL2Eps);
  for (int i = 0; i < n; ++i) dst[i] = src[i] * f;
}

// exp(x), vectorisable, for x <= ~88: exact range reduction by ln 2 (two-part constant), degree-7
// Taylor polynomial on |r| <= ln2/2 (truncation < 1.3e-7 relative), scaled by 2^n through the exponent
// bits; 0 below -87 (where exp is under float's normal range). Within ~2 ulp of std::exp.
BALLAST_INLINE float fast_exp(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = std::bit_cast<float>((int32_t(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

// Inside a chunk the decay factors e^{gc} reach far below float's normal range (g ~ -3 per step gives
// e^-190 at the end of a 64-step chunk); on Intel cores every denormal operand or result costs a
// microcode assist (measured: the chunked form ran 8x slower on a Xeon than on an EPYC). Both forms
// therefore run with flush-to-zero and denormals-are-zero set on the calling thread, restored after;
// only magnitudes below 1.2e-38 are affected.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

struct Args {
  DeltaRuleShape s;
  const float *q, *k, *v, *g, *beta;
  int64_t ldq, ldk, ldv, ldo;
  float* state;
  float* out;
};

// All T steps of value head h by the recurrence, reading the state once and writing it once per step:
//   kv = S^T k, sq = S^T q (old S);  u = beta (v - d kv);  o = d sq + (k . q) u;  S = d S + k u^T.
// work: 2 * dk + 3 * dv floats.
BALLAST_MV void recurrent_head(const Args& a, int h, float* work) {
  const int dk = a.s.dk, dv = a.s.dv, Hv = a.s.Hv, hk = h / (Hv / a.s.Hk);
  const float qscale = 1.0f / std::sqrt(float(dk));
  float* S = a.state + int64_t(h) * dk * dv;
  float* qn = work;
  float* kn = qn + dk;
  float* kv = kn + dk;
  float* sq = kv + dv;
  float* u = sq + dv;
  for (int t = 0; t < a.s.T; ++t) {
    l2norm_scaled(a.q + t * a.ldq + int64_t(hk) * dk, dk, qscale, qn);
    l2norm_scaled(a.k + t * a.ldk + int64_t(hk) * dk, dk, 1.0f, kn);
    const float d = std::exp(a.g[int64_t(t) * Hv + h]);
    const float b = a.beta[int64_t(t) * Hv + h];
    const float* vt = a.v + t * a.ldv + int64_t(h) * dv;
    float* o = a.out + t * a.ldo + int64_t(h) * dv;
    for (int j = 0; j < dv; ++j) kv[j] = sq[j] = 0.f;
    float kq = 0.f;
    for (int p = 0; p < dk; ++p) {
      const float* row = S + int64_t(p) * dv;
      const float kp = kn[p], qp = qn[p];
      kq += kp * qp;
      for (int j = 0; j < dv; ++j) {
        kv[j] += kp * row[j];
        sq[j] += qp * row[j];
      }
    }
    for (int j = 0; j < dv; ++j) {
      u[j] = b * (vt[j] - d * kv[j]);
      o[j] = d * sq[j] + kq * u[j];
    }
    for (int p = 0; p < dk; ++p) {
      float* row = S + int64_t(p) * dv;
      const float kp = kn[p];
      for (int j = 0; j < dv; ++j) row[j] = d * row[j] + kp * u[j];
    }
  }
}

// Scratch for one chunk of at most C steps. Every entry the chunk reads it has written first, so a
// thread keeps one and re-lays it per call (no allocation once it is large enough).
struct ChunkScratch {
  std::vector<float> buf;
  float *Q, *K, *Kt, *Kdt, *Qg, *G, *QK, *A, *P, *Tinv, *B, *WU, *drow, *eg, *ef;
  std::vector<double> gc;
  void lay_out(int C, int dk, int dv) {
    const int64_t cd = int64_t(C) * dk, cc = int64_t(C) * C, cdv = int64_t(C) * (dk + dv);
    buf.resize(size_t(5 * cd + 5 * cc + 2 * cdv + 3 * int64_t(C)));
    float* p = buf.data();
    auto take = [&](int64_t m) {
      float* r = p;
      p += m;
      return r;
    };
    Q = take(cd), K = take(cd), Kt = take(cd), Kdt = take(cd), Qg = take(cd);
    G = take(cc), QK = take(cc), A = take(cc), P = take(cc), Tinv = take(cc);
    B = take(cdv), WU = take(cdv);
    drow = take(C), eg = take(C), ef = take(C);
    gc.resize(size_t(C));
  }
};

BALLAST_INLINE void prefetch_row(const float* p, int n) {
  for (int i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

// All T steps of value heads [h0, h1) (all of key head hk) in chunks of C. The heads share the
// normalised q/k, K^T and the Gram matrices K K^T and Q K^T; each keeps its own gates and state.
BALLAST_MV void chunked_group(const Args& a, int hk, int h0, int h1, int C, ChunkScratch& w) {
  const int dk = a.s.dk, dv = a.s.dv, Hv = a.s.Hv;
  const int dkv = dk + dv;
  const float qscale = 1.0f / std::sqrt(float(dk));
  for (int t0 = 0; t0 < a.s.T; t0 += C) {
    const int L = std::min(C, a.s.T - t0);
    // Start the next chunk's input rows on their way while this one computes.
    for (int64_t t = t0 + L, te = std::min<int64_t>(a.s.T, t0 + L + C); t < te; ++t) {
      prefetch_row(a.q + t * a.ldq + int64_t(hk) * dk, dk);
      prefetch_row(a.k + t * a.ldk + int64_t(hk) * dk, dk);
      prefetch_row(a.v + t * a.ldv + int64_t(h0) * dv, (h1 - h0) * dv);
    }
    // Shared by the group: normalised rows, K^T, lower triangles of K K^T and Q K^T.
    for (int i = 0; i < L; ++i) {
      const int64_t t = t0 + i;
      l2norm_scaled(a.q + t * a.ldq + int64_t(hk) * dk, dk, qscale, w.Q + int64_t(i) * dk);
      l2norm_scaled(a.k + t * a.ldk + int64_t(hk) * dk, dk, 1.0f, w.K + int64_t(i) * dk);
    }
    for (int i = 0; i < L; ++i)
      for (int p = 0; p < dk; ++p) w.Kt[int64_t(p) * L + i] = w.K[int64_t(i) * dk + p];
    gemm(L, L, dk, 1.0f, w.K, dk, w.Kt, L, w.G, L, false, false, true);
    gemm(L, L, dk, 1.0f, w.Q, dk, w.Kt, L, w.QK, L, false, false, true);

    for (int h = h0; h < h1; ++h) {
      float* S = a.state + int64_t(h) * dk * dv;
      const float* gt = a.g + int64_t(t0) * Hv + h;
      const float* bt = a.beta + int64_t(t0) * Hv + h;
      // Cumulative log-decay in double: its differences are exponentiated.
      double cum = 0.0;
      for (int i = 0; i < L; ++i) {
        cum += double(gt[int64_t(i) * Hv]);
        w.gc[i] = cum;
        w.eg[i] = float(std::exp(cum));
      }
      // A = beta_i D_ij G_ij (j < i), P = D_ij QK_ij (j <= i), zeros elsewhere.
      for (int i = 0; i < L; ++i) {
        const float bi = bt[int64_t(i) * Hv];
        for (int j = 0; j < i; ++j) w.drow[j] = float(w.gc[i] - w.gc[j]);
        for (int j = 0; j < i; ++j) w.drow[j] = fast_exp(w.drow[j]);
        const float* Gr = w.G + int64_t(i) * L;
        const float* QKr = w.QK + int64_t(i) * L;
        float* Ar = w.A + int64_t(i) * L;
        float* Pr = w.P + int64_t(i) * L;
        for (int j = 0; j < i; ++j) {
          Ar[j] = bi * w.drow[j] * Gr[j];
          Pr[j] = w.drow[j] * QKr[j];
        }
        Pr[i] = QKr[i];
        for (int j = i; j < L; ++j) Ar[j] = 0.f;
        for (int j = i + 1; j < L; ++j) Pr[j] = 0.f;
      }
      // Tinv = (I + A)^-1, unit lower triangular, row by row.
      for (int i = 0; i < L; ++i) {
        float* Ti = w.Tinv + int64_t(i) * L;
        for (int c = 0; c < L; ++c) Ti[c] = 0.f;
        const float* Ai = w.A + int64_t(i) * L;
        for (int m = 0; m < i; ++m) {
          const float am = Ai[m];
          const float* Tm = w.Tinv + int64_t(m) * L;
          for (int c = 0; c <= m; ++c) Ti[c] -= am * Tm[c];
        }
        Ti[i] = 1.0f;
      }
      // B = [beta e^gc K | beta V];  [W | U] = Tinv B;  U -= W S0.
      for (int i = 0; i < L; ++i) {
        const int64_t t = t0 + i;
        const float bi = bt[int64_t(i) * Hv];
        const float bk = bi * w.eg[i];
        float* Br = w.B + int64_t(i) * dkv;
        const float* Kr = w.K + int64_t(i) * dk;
        const float* vr = a.v + t * a.ldv + int64_t(h) * dv;
        for (int p = 0; p < dk; ++p) Br[p] = bk * Kr[p];
        for (int j = 0; j < dv; ++j) Br[dk + j] = bi * vr[j];
      }
      gemm(L, dkv, L, 1.0f, w.Tinv, L, w.B, dkv, w.WU, dkv, false, true);
      float* U = w.WU + dk;
      gemm(L, dv, dk, -1.0f, w.WU, dkv, S, dv, U, dkv, true);

      // O = diag(e^gc) Q S0 + P U, written straight to out.
      for (int i = 0; i < L; ++i) {
        const float* Qr = w.Q + int64_t(i) * dk;
        float* Qgr = w.Qg + int64_t(i) * dk;
        const float e = w.eg[i];
        for (int p = 0; p < dk; ++p) Qgr[p] = e * Qr[p];
      }
      float* O = a.out + int64_t(t0) * a.ldo + int64_t(h) * dv;
      gemm(L, dv, dk, 1.0f, w.Qg, dk, S, dv, O, a.ldo, false);
      gemm(L, dv, L, 1.0f, w.P, L, U, dkv, O, a.ldo, true, true);

      // S = e^{gc_last} S0 + (diag(e^{gc_last - gc}) K)^T U.
      const double glast = w.gc[L - 1];
      for (int i = 0; i < L; ++i) w.ef[i] = float(std::exp(glast - w.gc[i]));
      for (int p = 0; p < dk; ++p) {
        const float* r = w.Kt + int64_t(p) * L;
        float* rd = w.Kdt + int64_t(p) * L;
        for (int i = 0; i < L; ++i) rd[i] = r[i] * w.ef[i];
      }
      const float elast = float(std::exp(glast));
      for (int64_t i = 0, n = int64_t(dk) * dv; i < n; ++i) S[i] *= elast;
      gemm(dk, dv, L, 1.0f, w.Kdt, L, U, dkv, S, dv, true);
    }
  }
}

void check_args(const char* fn, const DeltaRuleShape& s, int64_t ldq, int64_t ldk, int64_t ldv, int64_t ldo) {
  check(s.T >= 0 && s.Hk > 0 && s.Hv > 0 && s.dk > 0 && s.dv > 0, "{}: bad shape T={} Hk={} Hv={} dk={} dv={}", fn,
        s.T, s.Hk, s.Hv, s.dk, s.dv);
  check(s.Hv % s.Hk == 0, "{}: Hv={} is not a multiple of Hk={}", fn, s.Hv, s.Hk);
  const int64_t kw = int64_t(s.Hk) * s.dk, vw = int64_t(s.Hv) * s.dv;
  check(s.T <= 1 || (ldq >= kw && ldk >= kw && ldv >= vw && ldo >= vw),
        "{}: row strides ldq={} ldk={} ldv={} ldo={} narrower than rows ({} / {})", fn, ldq, ldk, ldv, ldo, kw, vw);
}

}  // namespace

void gated_delta_rule_recurrent(const DeltaRuleShape& s, const float* q, int64_t ldq, const float* k, int64_t ldk,
                                const float* v, int64_t ldv, const float* g, const float* beta, float* state,
                                float* out, int64_t ldo, ThreadPool* pool) {
  check_args("gated_delta_rule_recurrent", s, ldq, ldk, ldv, ldo);
  if (s.T == 0) return;
  const Args a{s, q, k, v, g, beta, ldq, ldk, ldv, ldo, state, out};
  auto run = [&](int64_t h0, int64_t h1) {
    FlushDenormals ftz;
    thread_local std::vector<float> work;
    work.resize(size_t(2 * s.dk + 3 * s.dv));
    for (int64_t h = h0; h < h1; ++h) recurrent_head(a, int(h), work.data());
  };
  if (pool)
    pool->parallel_for(s.Hv, [&run](int64_t h0, int64_t h1) { run(h0, h1); });
  else
    run(0, s.Hv);
}

void gated_delta_rule_chunked(const DeltaRuleShape& s, const float* q, int64_t ldq, const float* k, int64_t ldk,
                              const float* v, int64_t ldv, const float* g, const float* beta, float* state,
                              float* out, int64_t ldo, ThreadPool* pool, int chunk) {
  check_args("gated_delta_rule_chunked", s, ldq, ldk, ldv, ldo);
  check(chunk >= 1 && chunk <= 1024, "gated_delta_rule_chunked: chunk {} not in [1, 1024]", chunk);
  if (s.T == 0) return;
  const Args a{s, q, k, v, g, beta, ldq, ldk, ldv, ldo, state, out};
  const int C = std::min(chunk, s.T);
  // Work items: a key head with a contiguous piece of its value heads. Whole groups share the most
  // work; a group is split only as far as needed to give every thread something to do.
  const int r = s.Hv / s.Hk;
  const int threads = pool ? pool->size() : 1;
  const int pieces = std::clamp((threads + s.Hk - 1) / s.Hk, 1, r);
  // Item i is piece i % pieces of key head i / pieces; pieces <= r, so none is empty.
  const int64_t items = int64_t(s.Hk) * pieces;
  auto run = [&](int64_t i0, int64_t i1) {
    FlushDenormals ftz;
    thread_local ChunkScratch w;
    w.lay_out(C, s.dk, s.dv);
    for (int64_t i = i0; i < i1; ++i) {
      const int hk = int(i / pieces), p = int(i % pieces);
      chunked_group(a, hk, hk * r + p * r / pieces, hk * r + (p + 1) * r / pieces, C, w);
    }
  };
  if (pool)
    pool->parallel_for(items, [&run](int64_t i0, int64_t i1) { run(i0, i1); });
  else
    run(0, items);
}

}  // namespace ballast::kernels::cpu
