// Gated delta rule: the recurrent and chunked CPU kernels against a float64 reference written from
// the spec (docs/model.md, Gated DeltaNet), and against each other.
#include "ballast/kernels/cpu/gated_delta_rule.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <random>
#include <vector>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "ballast/core/error.h"
#include "ballast/core/thread_pool.h"

using namespace ballast;
using namespace ballast::kernels::cpu;

namespace {

// One sequence's inputs, rows padded (strides wider than the rows) to exercise the strides.
struct Case {
  DeltaRuleShape s;
  int64_t ldq, ldk, ldv, ldo;
  std::vector<float> q, k, v, g, beta, state0;

  Case(DeltaRuleShape shape, uint32_t seed, float g_lo = -3.f, bool zero_state = false, float qk_scale = 1.f)
      : s(shape) {
    ldq = int64_t(s.Hk) * s.dk + 3;
    ldk = int64_t(s.Hk) * s.dk + 5;
    ldv = int64_t(s.Hv) * s.dv + 2;
    ldo = int64_t(s.Hv) * s.dv + 1;
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_real_distribution<float> gd(g_lo, 0.f), bd(0.01f, 0.99f);
    auto fill = [&](std::vector<float>& x, size_t n, auto&& dist) {
      x.resize(n);
      for (auto& e : x) e = dist(rng);
    };
    fill(q, size_t(s.T) * ldq, normal);
    fill(k, size_t(s.T) * ldk, normal);
    fill(v, size_t(s.T) * ldv, normal);
    fill(g, size_t(s.T) * s.Hv, gd);
    fill(beta, size_t(s.T) * s.Hv, bd);
    fill(state0, size_t(s.Hv) * s.dk * s.dv, normal);
    if (zero_state) std::fill(state0.begin(), state0.end(), 0.f);
    for (auto& e : q) e *= qk_scale;
    for (auto& e : k) e *= qk_scale;
  }
  size_t out_size() const { return size_t(std::max(s.T, 1)) * size_t(ldo); }
};

// The recurrence exactly as the spec writes it, in float64.
void reference(const Case& c, std::vector<double>& S, std::vector<double>& out) {
  const auto& s = c.s;
  const int r = s.Hv / s.Hk;
  S.assign(c.state0.begin(), c.state0.end());
  out.assign(c.out_size(), 0.0);
  std::vector<double> qn(s.dk), kn(s.dk), u(s.dv);
  for (int t = 0; t < s.T; ++t)
    for (int h = 0; h < s.Hv; ++h) {
      const int hk = h / r;
      const float* qr = &c.q[size_t(t) * c.ldq + size_t(hk) * s.dk];
      const float* kr = &c.k[size_t(t) * c.ldk + size_t(hk) * s.dk];
      double sq = 0, sk = 0;
      for (int i = 0; i < s.dk; ++i) sq += double(qr[i]) * qr[i], sk += double(kr[i]) * kr[i];
      for (int i = 0; i < s.dk; ++i) {
        qn[i] = qr[i] / std::sqrt(sq + 1e-6) / std::sqrt(double(s.dk));
        kn[i] = kr[i] / std::sqrt(sk + 1e-6);
      }
      double* Sh = &S[size_t(h) * s.dk * s.dv];
      const double decay = std::exp(double(c.g[size_t(t) * s.Hv + h]));
      const double b = c.beta[size_t(t) * s.Hv + h];
      for (int i = 0; i < s.dk * s.dv; ++i) Sh[i] *= decay;
      for (int j = 0; j < s.dv; ++j) {
        double kv = 0;
        for (int i = 0; i < s.dk; ++i) kv += Sh[i * s.dv + j] * kn[i];
        u[j] = b * (c.v[size_t(t) * c.ldv + size_t(h) * s.dv + j] - kv);
      }
      for (int i = 0; i < s.dk; ++i)
        for (int j = 0; j < s.dv; ++j) Sh[i * s.dv + j] += kn[i] * u[j];
      for (int j = 0; j < s.dv; ++j) {
        double o = 0;
        for (int i = 0; i < s.dk; ++i) o += Sh[i * s.dv + j] * qn[i];
        out[size_t(t) * c.ldo + size_t(h) * s.dv + j] = o;
      }
    }
}

struct Result {
  std::vector<float> out, state;
};

enum class Form { Recurrent, Chunked };

Result run(const Case& c, Form f, ThreadPool* pool = nullptr, int chunk = 64) {
  Result r{std::vector<float>(c.out_size(), 0.f), c.state0};
  if (f == Form::Recurrent)
    gated_delta_rule_recurrent(c.s, c.q.data(), c.ldq, c.k.data(), c.ldk, c.v.data(), c.ldv, c.g.data(),
                               c.beta.data(), r.state.data(), r.out.data(), c.ldo, pool);
  else
    gated_delta_rule_chunked(c.s, c.q.data(), c.ldq, c.k.data(), c.ldk, c.v.data(), c.ldv, c.g.data(),
                             c.beta.data(), r.state.data(), r.out.data(), c.ldo, pool, chunk);
  return r;
}

// ||a - b|| / ||b|| over the output rows' valid columns (padding excluded) or a whole state.
template <typename A, typename B>
double rel_err(const A& a, const B& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

template <typename V>
std::vector<double> valid_out(const Case& c, const V& out) {
  std::vector<double> r;
  for (int t = 0; t < c.s.T; ++t)
    for (int i = 0; i < c.s.Hv * c.s.dv; ++i) r.push_back(double(out[size_t(t) * c.ldo + i]));
  return r;
}

double norm(const std::vector<double>& x) {
  double s = 0;
  for (double e : x) s += e * e;
  return std::sqrt(s);
}

struct ShapeParam {
  int Hk, Hv, dk, dv;
};

class DeltaRuleVsReference : public ::testing::TestWithParam<std::tuple<ShapeParam, int>> {};

TEST_P(DeltaRuleVsReference, BothFormsMatchFloat64) {
  const auto [sp, T] = GetParam();
  const Case c({T, sp.Hk, sp.Hv, sp.dk, sp.dv}, 1000u + uint32_t(T) * 7u + uint32_t(sp.Hv * 131 + sp.dk));
  std::vector<double> S_ref, out_ref;
  reference(c, S_ref, out_ref);
  const auto ref_o = valid_out(c, out_ref);
  ASSERT_GT(norm(ref_o), 1e-3) << "degenerate test input";

  const Result rec = run(c, Form::Recurrent), chk = run(c, Form::Chunked);
  const double e_rec_o = rel_err(valid_out(c, rec.out), ref_o), e_rec_s = rel_err(rec.state, S_ref);
  const double e_chk_o = rel_err(valid_out(c, chk.out), ref_o), e_chk_s = rel_err(chk.state, S_ref);
  const double e_cr_o = rel_err(valid_out(c, chk.out), valid_out(c, rec.out));
  const double e_cr_s = rel_err(chk.state, rec.state);
  EXPECT_LT(e_rec_o, 2e-6) << "recurrent out vs f64";
  EXPECT_LT(e_rec_s, 2e-6) << "recurrent state vs f64";
  EXPECT_LT(e_chk_o, 2e-6) << "chunked out vs f64";
  EXPECT_LT(e_chk_s, 2e-6) << "chunked state vs f64";
  EXPECT_LT(e_cr_o, 1e-5) << "chunked vs recurrent out";
  EXPECT_LT(e_cr_s, 1e-5) << "chunked vs recurrent state";
  RecordProperty("err_rec_out", std::to_string(e_rec_o));
  RecordProperty("err_chk_out", std::to_string(e_chk_o));
  if (std::getenv("BALLAST_PRINT_ERRORS"))
    std::printf("T=%d Hk=%d Hv=%d dk=%d dv=%d  rec/f64 out %.2e state %.2e | chk/f64 out %.2e state %.2e | "
                "chk/rec out %.2e state %.2e\n",
                T, sp.Hk, sp.Hv, sp.dk, sp.dv, e_rec_o, e_rec_s, e_chk_o, e_chk_s, e_cr_o, e_cr_s);
}

INSTANTIATE_TEST_SUITE_P(Shapes, DeltaRuleVsReference,
                         ::testing::Combine(::testing::Values(ShapeParam{1, 1, 16, 16},   // r = 1
                                                              ShapeParam{2, 4, 32, 24},   // r = 2, dk > dv
                                                              ShapeParam{1, 3, 8, 20},    // r = 3, dk < dv
                                                              ShapeParam{2, 6, 13, 7},    // odd sizes (tails)
                                                              ShapeParam{1, 2, 128, 128}  // real head size
                                                              ),
                                            ::testing::Values(1, 2, 63, 64, 65, 130, 257)));

TEST(DeltaRule, ChunkSizesAgree) {
  const Case c({150, 2, 4, 24, 40}, 7);
  const Result rec = run(c, Form::Recurrent);
  for (int chunk : {1, 5, 16, 32, 64, 128, 200}) {
    const Result r = run(c, Form::Chunked, nullptr, chunk);
    EXPECT_LT(rel_err(valid_out(c, r.out), valid_out(c, rec.out)), 1e-5) << "chunk " << chunk;
    EXPECT_LT(rel_err(r.state, rec.state), 1e-5) << "chunk " << chunk;
  }
}

TEST(DeltaRule, ThreadPoolGivesIdenticalResults) {
  ThreadPool pool(3);
  const Case c({97, 2, 6, 32, 16}, 11);
  for (Form f : {Form::Recurrent, Form::Chunked}) {
    const Result a = run(c, f), b = run(c, f, &pool);
    EXPECT_EQ(a.out, b.out);
    EXPECT_EQ(a.state, b.state);
  }
}

// Prefill T1 steps with the chunked form, then decode the rest one step at a time with the
// recurrence; must equal one chunked pass (and the reference) over all steps.
TEST(DeltaRule, PrefillThenDecodeEqualsOnePass) {
  const int T = 150;
  const Case all({T, 2, 4, 32, 48}, 21);
  std::vector<double> S_ref, out_ref;
  reference(all, S_ref, out_ref);
  const Result whole = run(all, Form::Chunked);
  for (int T1 : {0, 1, 64, 100}) {
    std::vector<float> state = all.state0, out(all.out_size(), 0.f);
    DeltaRuleShape s1 = all.s;
    s1.T = T1;
    gated_delta_rule_chunked(s1, all.q.data(), all.ldq, all.k.data(), all.ldk, all.v.data(), all.ldv,
                             all.g.data(), all.beta.data(), state.data(), out.data(), all.ldo, nullptr);
    for (int t = T1; t < T; ++t) {
      DeltaRuleShape s2 = all.s;
      s2.T = 1;
      const int Hv = all.s.Hv;
      gated_delta_rule_recurrent(s2, &all.q[size_t(t) * all.ldq], all.ldq, &all.k[size_t(t) * all.ldk], all.ldk,
                                 &all.v[size_t(t) * all.ldv], all.ldv, &all.g[size_t(t) * Hv],
                                 &all.beta[size_t(t) * Hv], state.data(), &out[size_t(t) * all.ldo], all.ldo,
                                 nullptr);
    }
    EXPECT_LT(rel_err(valid_out(all, out), valid_out(all, whole.out)), 1e-5) << "T1=" << T1;
    EXPECT_LT(rel_err(state, whole.state), 1e-5) << "T1=" << T1;
    EXPECT_LT(rel_err(valid_out(all, out), valid_out(all, out_ref)), 2e-6) << "T1=" << T1;
    EXPECT_LT(rel_err(state, S_ref), 2e-6) << "T1=" << T1;
  }
}

// Two chunked calls (state carried between them) equal one.
TEST(DeltaRule, ChunkedCallsChain) {
  const Case all({200, 1, 2, 16, 16}, 5);
  const Result whole = run(all, Form::Chunked);
  std::vector<float> state = all.state0, out(all.out_size(), 0.f);
  const int T1 = 77, Hv = all.s.Hv;
  DeltaRuleShape a = all.s, b = all.s;
  a.T = T1;
  b.T = all.s.T - T1;
  gated_delta_rule_chunked(a, all.q.data(), all.ldq, all.k.data(), all.ldk, all.v.data(), all.ldv, all.g.data(),
                           all.beta.data(), state.data(), out.data(), all.ldo, nullptr);
  gated_delta_rule_chunked(b, &all.q[size_t(T1) * all.ldq], all.ldq, &all.k[size_t(T1) * all.ldk], all.ldk,
                           &all.v[size_t(T1) * all.ldv], all.ldv, &all.g[size_t(T1) * Hv], &all.beta[size_t(T1) * Hv],
                           state.data(), &out[size_t(T1) * all.ldo], all.ldo, nullptr);
  EXPECT_LT(rel_err(valid_out(all, out), valid_out(all, whole.out)), 1e-5);
  EXPECT_LT(rel_err(state, whole.state), 1e-5);
}

// The incoming state must matter (guards against a kernel that ignores it), and a zero state works.
TEST(DeltaRule, IncomingStateMatters) {
  const Case with({40, 1, 2, 16, 16}, 9, -0.2f), without({40, 1, 2, 16, 16}, 9, -0.2f, true);
  for (Form f : {Form::Recurrent, Form::Chunked}) {
    const Result a = run(with, f), b = run(without, f);
    EXPECT_GT(rel_err(valid_out(with, a.out), valid_out(without, b.out)), 1e-2);
    std::vector<double> S_ref, out_ref;
    reference(without, S_ref, out_ref);
    EXPECT_LT(rel_err(valid_out(without, b.out), valid_out(without, out_ref)), 2e-6);
  }
}

// Strong decay (cumulative log-decay far below float's exp range inside a chunk) stays finite and exact.
TEST(DeltaRule, StrongDecayStaysFinite) {
  const Case c({130, 1, 2, 16, 16}, 13, -30.f);
  std::vector<double> S_ref, out_ref;
  reference(c, S_ref, out_ref);
  for (Form f : {Form::Recurrent, Form::Chunked}) {
    const Result r = run(c, f);
    for (float x : r.out) ASSERT_TRUE(std::isfinite(x));
    for (float x : r.state) ASSERT_TRUE(std::isfinite(x));
    EXPECT_LT(rel_err(valid_out(c, r.out), valid_out(c, out_ref)), 2e-6);
    EXPECT_LT(rel_err(r.state, S_ref), 2e-6);
  }
}

// Tiny q/k (sum of squares ~ the 1e-6 eps): the l2norm's eps placement must match the reference.
TEST(DeltaRule, TinyKeysFollowL2NormEps) {
  const Case c({70, 1, 2, 16, 16}, 17, -3.f, false, 3e-4f);
  std::vector<double> S_ref, out_ref;
  reference(c, S_ref, out_ref);
  for (Form f : {Form::Recurrent, Form::Chunked}) {
    const Result r = run(c, f);
    EXPECT_LT(rel_err(valid_out(c, r.out), valid_out(c, out_ref)), 2e-6);
    EXPECT_LT(rel_err(r.state, S_ref), 2e-6);
  }
}

#if defined(__x86_64__)
// The kernels flush denormals while they run (see gated_delta_rule.cpp) and must restore the caller's
// floating-point control word.
TEST(DeltaRule, LeavesFloatingPointControlAsFound) {
  const Case c({70, 1, 2, 16, 16}, 19);
  const unsigned before = _mm_getcsr();
  for (Form f : {Form::Recurrent, Form::Chunked}) {
    run(c, f);
    EXPECT_EQ(_mm_getcsr(), before);
  }
}
#endif

TEST(DeltaRule, ZeroStepsIsANoOp) {
  Case c({0, 1, 1, 8, 8}, 3);
  const Result r = run(c, Form::Chunked), r2 = run(c, Form::Recurrent);
  EXPECT_EQ(r.state, c.state0);
  EXPECT_EQ(r2.state, c.state0);
}

TEST(DeltaRule, BadShapesThrow) {
  std::vector<float> buf(4096, 0.f);
  float* p = buf.data();
  auto call = [&](DeltaRuleShape s, bool chunked, int chunk = 64) {
    if (chunked)
      gated_delta_rule_chunked(s, p, 64, p, 64, p, 64, p, p, p, p, 64, nullptr, chunk);
    else
      gated_delta_rule_recurrent(s, p, 64, p, 64, p, 64, p, p, p, p, 64, nullptr);
  };
  for (bool chunked : {false, true}) {
    EXPECT_THROW(call({2, 2, 3, 8, 8}, chunked), Error);   // Hv not a multiple of Hk
    EXPECT_THROW(call({2, 1, 1, 0, 8}, chunked), Error);   // dk = 0
    EXPECT_THROW(call({2, 1, 1, 8, -1}, chunked), Error);  // dv < 0
    EXPECT_THROW(call({-1, 1, 1, 8, 8}, chunked), Error);  // T < 0
    EXPECT_THROW(call({2, 1, 16, 8, 8}, chunked), Error);  // ldv/ldo narrower than Hv*dv
  }
  EXPECT_THROW(call({2, 1, 1, 8, 8}, true, 0), Error);
}

}  // namespace
