// Causal depthwise conv1d + SiLU against a float64 reference; decode steps, splits and threads.
#include "ballast/kernels/cpu/causal_conv1d.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/core/thread_pool.h"

using namespace ballast;
using namespace ballast::kernels::cpu;

namespace {

struct ConvCase {
  int T, C, kc;
  int64_t ldx, ldo;
  std::vector<float> x, w, state0;
  ConvCase(int T_, int C_, int kc_, uint32_t seed) : T(T_), C(C_), kc(kc_), ldx(C_ + 3), ldo(C_ + 1) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    x.resize(size_t(T) * ldx);
    w.resize(size_t(C) * kc);
    state0.resize(size_t(C) * (kc - 1));
    for (auto* v : {&x, &w, &state0})
      for (auto& e : *v) e = nd(rng);
  }
};

// out[t, c] = silu(sum_j w[c, j] * in[t + j, c]) over in = [state ; x] (time-major), in float64.
void reference(const ConvCase& c, std::vector<double>& out, std::vector<double>& state) {
  const int ks = c.kc - 1;
  std::vector<double> in(size_t(ks + c.T) * c.C);
  for (int ch = 0; ch < c.C; ++ch) {
    for (int i = 0; i < ks; ++i) in[size_t(i) * c.C + ch] = c.state0[size_t(ch) * ks + i];
    for (int t = 0; t < c.T; ++t) in[size_t(ks + t) * c.C + ch] = c.x[size_t(t) * c.ldx + ch];
  }
  out.assign(size_t(c.T) * c.C, 0.0);
  for (int t = 0; t < c.T; ++t)
    for (int ch = 0; ch < c.C; ++ch) {
      double a = 0;
      for (int j = 0; j < c.kc; ++j) a += double(c.w[size_t(ch) * c.kc + j]) * in[size_t(t + j) * c.C + ch];
      out[size_t(t) * c.C + ch] = a / (1.0 + std::exp(-a));
    }
  state.assign(size_t(c.C) * ks, 0.0);
  for (int ch = 0; ch < c.C; ++ch)
    for (int i = 0; i < ks; ++i) state[size_t(ch) * ks + i] = in[size_t(c.T + i) * c.C + ch];
}

// Runs the kernel over [t0, t1) of the case, carrying `state`.
void run_range(const ConvCase& c, int t0, int t1, std::vector<float>& state, std::vector<float>& out,
               ThreadPool* pool = nullptr) {
  causal_conv1d_silu(c.x.data() + size_t(t0) * c.ldx, c.ldx, t1 - t0, c.C, c.w.data(), c.kc, state.data(),
                     out.data() + size_t(t0) * c.ldo, c.ldo, pool);
}

void expect_matches(const ConvCase& c, const std::vector<float>& out, const std::vector<float>& state,
                    const std::vector<double>& ro, const std::vector<double>& rs, const std::string& what) {
  double worst = 0;
  for (int t = 0; t < c.T; ++t)
    for (int ch = 0; ch < c.C; ++ch) {
      const double r = ro[size_t(t) * c.C + ch];
      worst = std::max(worst, std::abs(out[size_t(t) * c.ldo + ch] - r) / (1.0 + std::abs(r)));
    }
  EXPECT_LT(worst, 1e-6) << what;
  ASSERT_EQ(state.size(), rs.size());
  for (size_t i = 0; i < rs.size(); ++i) ASSERT_EQ(double(state[i]), rs[i]) << what << " state " << i;
}

class ConvVsReference : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(ConvVsReference, FullPassStepsAndSplits) {
  const auto [T, C, kc] = GetParam();
  const ConvCase c(T, C, kc, uint32_t(T * 1000 + C * 10 + kc));
  std::vector<double> ro, rs;
  reference(c, ro, rs);
  const std::string tag = "T=" + std::to_string(T) + " C=" + std::to_string(C) + " kc=" + std::to_string(kc);

  // One pass.
  std::vector<float> state = c.state0, full(size_t(std::max(T, 1)) * c.ldo, 0.f);
  run_range(c, 0, T, state, full);
  expect_matches(c, full, state, ro, rs, tag + " full");

  // One step at a time (decode) gives the same bits.
  std::vector<float> st1 = c.state0, steps(full.size(), 0.f);
  for (int t = 0; t < T; ++t) run_range(c, t, t + 1, st1, steps);
  EXPECT_EQ(steps, full) << tag;
  EXPECT_EQ(st1, state) << tag;

  // Split into pieces, some shorter than kc-1.
  for (int cut : {1, 2, kc - 2, T / 2}) {
    if (cut <= 0 || cut >= T) continue;
    std::vector<float> st2 = c.state0, parts(full.size(), 0.f);
    run_range(c, 0, cut, st2, parts);
    run_range(c, cut, std::min(T, cut + 1), st2, parts);
    run_range(c, std::min(T, cut + 1), T, st2, parts);
    EXPECT_EQ(parts, full) << tag << " cut " << cut;
    EXPECT_EQ(st2, state) << tag << " cut " << cut;
  }

  // Threads give the same bits.
  ThreadPool pool(3);
  std::vector<float> st3 = c.state0, pooled(full.size(), 0.f);
  run_range(c, 0, T, st3, pooled, &pool);
  EXPECT_EQ(pooled, full) << tag;
  EXPECT_EQ(st3, state) << tag;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConvVsReference,
                         ::testing::Combine(::testing::Values(1, 2, 3, 5, 100), ::testing::Values(1, 7, 64, 130, 600),
                                            ::testing::Values(4, 2, 1)));

TEST(CausalConv1d, ZeroStateAtSequenceStartIsZeroPadding) {
  // With a zero state, out[0, c] = silu(w[c, kc-1] * x[0, c]).
  ConvCase c(3, 5, 4, 42);
  std::vector<float> state(c.state0.size(), 0.f), out(size_t(c.T) * c.ldo, 0.f);
  run_range(c, 0, c.T, state, out);
  for (int ch = 0; ch < c.C; ++ch) {
    const double a = double(c.w[size_t(ch) * 4 + 3]) * c.x[size_t(ch)];
    EXPECT_NEAR(out[size_t(ch)], a / (1 + std::exp(-a)), 1e-6);
  }
}

TEST(CausalConv1d, BadShapesThrow) {
  std::vector<float> b(256, 0.f);
  EXPECT_THROW(causal_conv1d_silu(b.data(), 8, 2, 8, b.data(), 0, b.data(), b.data(), 8, nullptr), Error);
  EXPECT_THROW(causal_conv1d_silu(b.data(), 8, 2, 0, b.data(), 4, b.data(), b.data(), 8, nullptr), Error);
  EXPECT_THROW(causal_conv1d_silu(b.data(), 4, 2, 8, b.data(), 4, b.data(), b.data(), 8, nullptr), Error);
}

}  // namespace
