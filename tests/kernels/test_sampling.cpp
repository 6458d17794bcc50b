// The sampling math of sampling.h (uniforms, distributions, inverse-CDF draws, speculative
// acceptance), which every backend's sample and verify_drafts ops share.
#include "ballast/kernels/sampling.h"

#include <gtest/gtest.h>

#include "ballast/core/error.h"

#include <cmath>
#include <numeric>
#include <set>
#include <vector>

using namespace ballast;
using namespace ballast::kernels;

namespace {

TEST(Sampling, UniformsAreDeterministicIndependentAndInRange) {
  std::set<double> seen;
  double sum = 0;
  const int N = 20000;
  for (int i = 0; i < N; ++i) {
    const double u = uniform(uint64_t(i / 100), i % 100, Draw(uint32_t(i % 4)));
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
    seen.insert(u);
  }
  EXPECT_EQ(seen.size(), size_t(N)) << "every (seed, position, stream) draws its own value";
  EXPECT_NEAR(sum / N, 0.5, 0.01);
  static_assert(uniform(7, 3, Draw::target) == uniform(7, 3, Draw::target), "usable at compile time");
  EXPECT_NE(uniform(7, 3, Draw::target), uniform(7, 3, Draw::draft));
  EXPECT_NE(uniform(7, 3, Draw::target), uniform(7, 4, Draw::target));
  EXPECT_NE(uniform(7, 3, Draw::target), uniform(8, 3, Draw::target));
  EXPECT_NE(uniform(7, -1, Draw::target), uniform(7, 0, Draw::target));
}

TEST(Sampling, DistributionsAreNormalisedAndTruncated) {
  const std::vector<float> logits{1.0f, 3.0f, 2.0f, 3.0f, -1.0f};
  EXPECT_EQ(argmax(logits), 1);  // ties to the lower index
  EXPECT_EQ(distribution(logits, 0.0f, 1.0f, 0), (std::vector<float>{0, 1, 0, 0, 0}));
  const auto p = distribution(logits, 1.0f, 1.0f, 0);
  EXPECT_NEAR(std::accumulate(p.begin(), p.end(), 0.0), 1.0, 1e-6);
  EXPECT_NEAR(p[1] / p[2], std::exp(1.0), 1e-4);
  const auto k2 = distribution(logits, 1.0f, 1.0f, 2);
  EXPECT_NEAR(k2[1], 0.5, 1e-6);
  EXPECT_NEAR(k2[3], 0.5, 1e-6);
  EXPECT_EQ(k2[0] + k2[2] + k2[4], 0.0f);
  // top_k 1 among tied leaders keeps the lower id.
  EXPECT_EQ(distribution(logits, 1.0f, 1.0f, 1), (std::vector<float>{0, 1, 0, 0, 0}));
  // top_p 0.5: the two tied leaders hold ~0.42 each; the nucleus needs both.
  const auto n = distribution(logits, 1.0f, 0.5f, 0);
  EXPECT_GT(n[1], 0.0f);
  EXPECT_GT(n[3], 0.0f);
  EXPECT_EQ(n[0] + n[2] + n[4], 0.0f);
  EXPECT_NEAR(n[1] + n[3], 1.0, 1e-6);
  const auto hot = distribution(logits, 0.25f, 1.0f, 0);
  EXPECT_GT(hot[1], p[1]);
  // The span form writes the same into a caller's buffer, overwriting what was there.
  std::vector<float> out(logits.size(), 9.0f);
  distribution(logits, 1.0f, 0.5f, 0, out);
  EXPECT_EQ(out, n);
  EXPECT_THROW(distribution(logits, 1.0f, 0.0f, 0), Error);
  EXPECT_THROW(distribution(logits, 1.0f, 1.0f, -1), Error);
}

TEST(Sampling, SampleIsTheInverseCdfAndSkipsZeroMass) {
  const std::vector<float> p{0.25f, 0.0f, 0.5f, 0.25f, 0.0f};
  EXPECT_EQ(kernels::sample(p, 0.0), 0);
  EXPECT_EQ(kernels::sample(p, 0.2499), 0);
  EXPECT_EQ(kernels::sample(p, 0.25), 2);
  EXPECT_EQ(kernels::sample(p, 0.7499), 2);
  EXPECT_EQ(kernels::sample(p, 0.75), 3);
  // u above the rounded total: the last token with mass, never a zero-mass one.
  EXPECT_EQ(kernels::sample(p, 0.9999999999), 3);
  EXPECT_EQ(kernels::sample(std::vector<float>{0.3f, 0.3f, 0.3f, 0.0f}, 0.95), 2);
}

TEST(Sampling, SpeculativeAcceptanceKeepsTheTargetDistribution) {
  const std::vector<float> p{0.05f, 0.4f, 0.05f, 0.3f, 0.2f, 0.0f};
  const std::vector<float> q{0.3f, 0.1f, 0.2f, 0.1f, 0.0f, 0.3f};
  const int N = 200000;
  std::vector<double> freq(p.size(), 0.0);
  int accepted = 0;
  for (int i = 0; i < N; ++i) {
    const uint64_t seed = uint64_t(i);
    const int32_t d = kernels::sample(q, uniform(seed, 5, Draw::draft));
    const Acceptance a = accept_or_resample(p, q, d, uniform(seed, 5, Draw::accept), uniform(seed, 5, Draw::residual));
    accepted += a.accepted;
    if (a.accepted) {
      EXPECT_EQ(a.token, d);
    }
    freq[size_t(a.token)] += 1.0 / N;
  }
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(freq[i], p[i], 0.005) << "token " << i;
  double overlap = 0;
  for (size_t i = 0; i < p.size(); ++i) overlap += std::min(p[i], q[i]);
  EXPECT_NEAR(double(accepted) / N, overlap, 0.005);  // acceptance rate = sum min(p, q)
}

TEST(Sampling, AcceptanceRuleAtTheEdges) {
  const std::vector<float> p{0.5f, 0.5f, 0.0f}, q{0.25f, 0.25f, 0.5f};
  // p(d) >= q(d): always accepted.
  EXPECT_TRUE(accept_or_resample(p, q, 0, 0.999, 0.5).accepted);
  // p(d) = 0: never accepted; the correction comes from max(0, p - q) = {0.25, 0.25, 0} / 0.5.
  const Acceptance a = accept_or_resample(p, q, 2, 0.0, 0.6);
  EXPECT_FALSE(a.accepted);
  EXPECT_EQ(a.token, 1);
  // q(d) = 0 (a draft q could not have drawn): rejected.
  EXPECT_FALSE(accept_or_resample(p, std::vector<float>{0.5f, 0.5f, 0.0f}, 2, 0.0, 0.1).accepted);
  // p == q: the residual is empty; the correction is drawn from p itself.
  const Acceptance same = accept_or_resample(p, p, 2, 0.0, 0.7);
  EXPECT_FALSE(same.accepted);
  EXPECT_EQ(same.token, 1);
  EXPECT_THROW(accept_or_resample(p, q, 3, 0.0, 0.0), Error);
}

}  // namespace
