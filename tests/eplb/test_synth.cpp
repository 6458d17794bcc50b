#include "ballast/core/error.h"
#include "ballast/eplb/replay.h"
#include "ballast/eplb/synth.h"

#include <gtest/gtest.h>

#include <cmath>

using namespace ballast::eplb;

TEST(Synth, ShapesAndDeterminism) {
  auto s = model_shape("qwen3-next");
  EXPECT_EQ(s.layers, 48);
  EXPECT_EQ(s.experts, 512);
  EXPECT_EQ(s.topk, 10);
  EXPECT_EQ(model_shape("qwen3.5-397b").layers, 60);
  EXPECT_EQ(model_shape("deepseek-v3").experts, 256);
  EXPECT_THROW(model_shape("llama"), ballast::Error);
  s.layers = 2, s.passes = 5, s.tokens = 1000;
  auto a = synth_trace(s), b = synth_trace(s);
  EXPECT_EQ(a.count, b.count);
  double sum = 0;
  for (int e = 0; e < s.experts; ++e) sum += a.at(0, 0)[e];
  EXPECT_NEAR(sum, 10000, 400);  // tokens * top-k, Poisson
  s.popularity = Popularity::zipf;
  auto z = synth_trace(s);
  EXPECT_NE(z.count, a.count);
}

// A steady trend moves popularity along one direction: the change of each expert's log-count
// from the first to the last passes follows the same direction in two halves of the run.
TEST(Synth, TrendMovesPopularityAlongOneDirection) {
  SynthSpec s = model_shape("deepseek-v3");
  s.layers = 1, s.passes = 3000, s.tokens = 4096, s.drift = 0, s.burst = 0;
  auto change = [&](const SynthSpec& sp, int a, int b) {  // log(sum of passes [b, b+500)) - log([a, a+500))
    auto c = synth_layer(sp, 0);
    std::vector<double> d(sp.experts);
    for (int e = 0; e < sp.experts; ++e) {
      double x = 1, y = 1;
      for (int t = 0; t < 500; ++t) x += c[size_t(a + t) * sp.experts + e], y += c[size_t(b + t) * sp.experts + e];
      d[e] = std::log(y / x);
    }
    return d;
  };
  auto corr = [](const std::vector<double>& x, const std::vector<double>& y) {
    double mx = 0, my = 0, sxy = 0, sxx = 0, syy = 0;
    for (size_t i = 0; i < x.size(); ++i) mx += x[i] / x.size(), my += y[i] / y.size();
    for (size_t i = 0; i < x.size(); ++i)
      sxy += (x[i] - mx) * (y[i] - my), sxx += (x[i] - mx) * (x[i] - mx), syy += (y[i] - my) * (y[i] - my);
    return sxy / std::sqrt(sxx * syy);
  };
  auto flat = change(s, 0, 1000), flat2 = change(s, 1500, 2500);
  s.trend = 1.0;
  auto a = change(s, 0, 1000), b = change(s, 1500, 2500);
  EXPECT_GT(corr(a, b), 0.8);          // the same experts keep rising
  EXPECT_LT(std::abs(corr(flat, flat2)), 0.3);  // without a trend only sampling noise changes
}

TEST(Suite, TrendsMultiplyTheWorkloads) {
  SynthSpec noise;
  auto plain = default_suite(10, 10, noise), drifting = default_suite(10, 10, noise, {0.0, 0.5});
  EXPECT_EQ(drifting.size(), 2 * plain.size());
  EXPECT_EQ(drifting[0].spec.name, plain[0].spec.name);
  EXPECT_EQ(drifting[1].spec.name, plain[0].spec.name + "/trend-0.5");
  EXPECT_EQ(drifting[1].spec.trend, 0.5);
}

TEST(Suite, BallastAtLeastDeepseekOnAQuickRun) {
  auto suite = default_suite(64, 32);
  std::vector<SuiteWorkload> few{suite[1], suite[8]};
  for (auto& w : few) w.spec.tokens = 2048;
  auto rows = run_suite(few, 64, {Algorithm::deepseek, Algorithm::ballast}, 4, 2);
  ASSERT_EQ(rows.size(), 6u);  // deepseek, ballast for static, ballast for balanced
  for (int i = 0; i < 2; ++i) {
    const auto& d = rows[3 * i];
    const auto& bs = rows[3 * i + 1];
    const auto& bb = rows[3 * i + 2];
    EXPECT_EQ(d.planned_for, "");
    EXPECT_EQ(bs.algorithm, "ballast");
    EXPECT_EQ(bs.planned_for, "static");
    EXPECT_EQ(bb.planned_for, "balanced");
    EXPECT_GE(bs.in_sample, d.in_sample - 1e-3) << bs.workload;
    // Planned for balanced dispatch, it beats every other placement under it.
    EXPECT_GT(bb.in_balanced, d.in_balanced) << bb.workload;
    EXPECT_GT(bb.in_balanced, bs.in_balanced) << bb.workload;
    EXPECT_GT(bb.out_balanced, d.out_balanced) << bb.workload;
    EXPECT_GE(bb.out_balanced, bb.out_static) << bb.workload;
  }
}

TEST(Replay, RunsAndCountsMigrations) {
  SynthSpec s = model_shape("deepseek-v3");
  s.layers = 2, s.passes = 60, s.tokens = 2048;
  auto trace = synth_trace(s);
  ReplayOptions o;
  o.interval = 20, o.ranks = 32, o.redundant = 32;
  auto series = replay(trace, o);
  ASSERT_EQ(series.size(), 4u);
  for (auto& x : series) {
    EXPECT_EQ(x.per_pass.size(), 60u);
    EXPECT_EQ(x.moved.size(), 2u);
    EXPECT_GT(x.mean_after_first, 0.5);
  }
}
