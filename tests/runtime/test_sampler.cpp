// Sampling and speculative sampling: the processed distributions, and that speculation keeps the
// output distributed exactly as the target's.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <numeric>

#include "ballast/io/safetensors.h"
#include "ballast/runtime/engine.h"
#include "ballast/runtime/sampler.h"
#include "ballast/runtime/speculative.h"
#include "fixtures.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

TEST(Sampler, DistributionsAreNormalisedAndTruncated) {
  const std::vector<float> logits{1.0f, 3.0f, 2.0f, 3.0f, -1.0f};
  auto g = distribution(logits, {});
  EXPECT_EQ(g, (std::vector<float>{0, 1, 0, 0, 0}));  // greedy: argmax, ties to the lower index
  auto p = distribution(logits, {.temperature = 1.0f});
  EXPECT_NEAR(std::accumulate(p.begin(), p.end(), 0.0), 1.0, 1e-6);
  EXPECT_NEAR(p[1] / p[2], std::exp(1.0), 1e-4);
  auto k2 = distribution(logits, {.temperature = 1.0f, .top_k = 2});
  EXPECT_NEAR(k2[1], 0.5, 1e-6);
  EXPECT_NEAR(k2[3], 0.5, 1e-6);
  EXPECT_EQ(k2[0] + k2[2] + k2[4], 0.0f);
  // top_p 0.5: the two tied leaders hold ~0.42 each; the nucleus needs both.
  auto n = distribution(logits, {.temperature = 1.0f, .top_p = 0.5f});
  EXPECT_GT(n[1], 0.0f);
  EXPECT_GT(n[3], 0.0f);
  EXPECT_EQ(n[2], 0.0f);
  auto hot = distribution(logits, {.temperature = 0.25f});
  EXPECT_GT(hot[1], p[1]);
}

TEST(Sampler, SpeculativeAcceptanceKeepsTheTargetDistribution) {
  std::mt19937_64 rng(42);
  const std::vector<float> p{0.05f, 0.4f, 0.05f, 0.3f, 0.2f, 0.0f};
  const std::vector<float> q{0.3f, 0.1f, 0.2f, 0.1f, 0.0f, 0.3f};
  const int N = 200000;
  std::vector<double> freq(p.size(), 0.0);
  int accepted = 0;
  for (int i = 0; i < N; ++i) {
    const int32_t d = sample(q, rng);
    const auto a = accept_or_resample(p, q, d, rng);
    accepted += a.accepted;
    freq[size_t(a.token)] += 1.0 / N;
  }
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(freq[i], p[i], 0.005) << "token " << i;
  double overlap = 0;
  for (size_t i = 0; i < p.size(); ++i) overlap += std::min(p[i], q[i]);
  EXPECT_NEAR(double(accepted) / N, overlap, 0.005);  // acceptance rate = sum min(p, q)
}

// End to end on the demo model (its MTP head is trained, so drafts are often accepted and often
// rejected): the joint distribution of the second and third sampled tokens, with and without
// speculation, over many seeds.
TEST(Sampler, SpeculativeSamplingMatchesPlainSamplingOnAModel) {
  auto engine = Engine::load(test::kDemoModel, {.threads = 1});
  auto ref = io::SafetensorsFile::open(test::kFixtures / "demo_reference.safetensors");
  const Tensor t = ref->get("prompt_ids");
  const std::vector<int32_t> prompt(t.data<int32_t>(), t.data<int32_t>() + 6);
  const int N = 600;  // 4 joint outcomes dominate (top-2 twice): two-sample TV noise is about 0.04
  std::map<std::pair<int32_t, int32_t>, double> plain, spec;
  double accepted_any = 0;
  for (int i = 0; i < N; ++i) {
    SamplingParams sp{.temperature = 1.0f, .top_k = 2, .seed = uint64_t(i)};
    auto a = engine->generate({prompt}, 3, {}, sp).outputs[0];
    plain[{a[1], a[2]}] += 1.0 / N;
    SpeculativeStats st;
    SamplingParams sq = sp;
    sq.seed = uint64_t(i) + 1000003;
    auto b = generate_speculative(*engine, {prompt}, 3, {.num_steps = 2, .sampling = sq}, &st).outputs[0];
    spec[{b[1], b[2]}] += 1.0 / N;
    accepted_any += st.accepted[0] > 0;
  }
  double tv = 0;
  for (auto& [k, v] : plain) tv += std::fabs(v - (spec.count(k) ? spec[k] : 0.0));
  for (auto& [k, v] : spec)
    if (!plain.count(k)) tv += v;
  tv /= 2;
  EXPECT_LT(tv, 0.1) << "total variation between speculative and plain sampling";
  RecordProperty("total_variation", std::to_string(tv));
  EXPECT_GT(accepted_any, N * 0.05) << "speculation never accepted a draft: the test would prove little";
}

}  // namespace
