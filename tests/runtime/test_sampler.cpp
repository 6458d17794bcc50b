// Speculative sampling on a model keeps the output distributed as the target's (the math itself,
// distributions and the acceptance rule, is tested with kernels/sampling.h in tests/kernels).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>

#include "ballast/io/safetensors.h"
#include "ballast/runtime/engine.h"
#include "ballast/runtime/speculative.h"
#include "fixtures.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

// End to end on the demo model (its MTP head is trained, so drafts are often accepted and often
// rejected): the joint distribution of the second and third sampled tokens, with and without
// speculation, over many seeds.
TEST(Sampler, SpeculativeSamplingMatchesPlainSamplingOnAModel) {
  auto engine = test::load_engine(test::kDemoModel, 1);
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
