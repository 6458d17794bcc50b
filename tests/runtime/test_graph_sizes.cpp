// The batch sizes graph passes are kept for (runtime/graph_sizes.h: SGLang's --cuda-graph-bs and
// --cuda-graph-max-bs), and an engine whose passes pad to them (on the CPU over a backend that
// records graphs as CUDA does).
#include <gtest/gtest.h>

#include "ballast/io/safetensors.h"
#include "ballast/runtime/engine.h"
#include "ballast/runtime/graph_sizes.h"
#include "fixtures.h"
#include "support/expect_error.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

TEST(GraphSizes, TheDefaultListIsFinerThanPowersOfTwo) {
  const std::vector<int> none;
  std::vector<int> want{1, 2, 4};
  for (int s = 8; s <= 256; s += 8) want.push_back(s);
  want.insert(want.end(), {272, 288});
  EXPECT_EQ(graph_sizes(none, 0, 300), want);
  EXPECT_EQ(graph_sizes(none, 0, 33), (std::vector<int>{1, 2, 4, 8, 16, 24, 32}));
  EXPECT_EQ(graph_sizes(none, 20, 300), (std::vector<int>{1, 2, 4, 8, 16}));  // --cuda-graph-max-bs
}

TEST(GraphSizes, GivenSizesAreSortedOnceEachAndBounded) {
  const std::vector<int> given{8, 3, 1, 8, 64, 5};
  EXPECT_EQ(graph_sizes(given, 0, 65), (std::vector<int>{1, 3, 5, 8, 64}));
  EXPECT_EQ(graph_sizes(given, 0, 33), (std::vector<int>{1, 3, 5, 8}));  // the runner's limit
  EXPECT_EQ(graph_sizes(given, 5, 65), (std::vector<int>{1, 3, 5}));
  const std::vector<int> zero{4, 0};
  test::expect_error([&] { graph_sizes(zero, 0, 65); }, {"--cuda-graph-bs", "0"});
}

TEST(GraphSizes, APassTakesTheSmallestSizeThatHoldsIt) {
  const std::vector<int> sizes{1, 2, 4, 8, 16, 24};
  EXPECT_EQ(graph_batch(sizes, 1), 1);
  EXPECT_EQ(graph_batch(sizes, 3), 4);
  EXPECT_EQ(graph_batch(sizes, 17), 24);
  EXPECT_EQ(graph_batch(sizes, 24), 24);
  EXPECT_EQ(graph_batch(sizes, 25), 0);  // larger than every size: eager
  EXPECT_EQ(graph_batch({}, 1), 0);
}

// Three sequences decoding: in the graph of 3 where 3 is a size (nothing padded), of 4 with the
// default sizes, and eagerly where the sizes stop at 2 (no graph held); the same tokens every way.
TEST(GraphSizes, AnEnginePadsToItsSizesOrRunsEagerly) {
  const auto dir = test::kFixtures / "qwen3_next_a";
  auto ref = io::SafetensorsFile::open(dir / "reference.safetensors");
  const auto a = test::ids(*ref, "prompt_ids"), b = test::ids(*ref, "short_prompt_ids");
  const std::vector<std::vector<int32_t>> prompts{a, b, {a.begin() + 3, a.begin() + 9}};
  const auto want = test::load_engine(dir, 1)->generate(prompts, 8).outputs;
  for (const auto& [sizes, graphed] : {std::pair{std::vector<int>{3}, true}, {std::vector<int>{}, true},
                                       {std::vector<int>{1, 2}, false}}) {
    EngineOptions opts;
    opts.cuda_graph_bs = sizes;
    auto engine = Engine::load(dir, test::capturing_backend(1), opts);
    EXPECT_EQ(engine->generate(prompts, 8).outputs, want) << sizes.size() << " sizes";
    const auto decode = engine->runner().replays(ModelRunner::GraphKind::decode);
    if (graphed) EXPECT_GT(decode, 0) << sizes.size() << " sizes";
    else EXPECT_EQ(decode, 0);
    // The graphs the backend holds are counted (bench reports them and what they took).
    EXPECT_EQ(engine->backend().counters().graphs > 0, graphed) << sizes.size() << " sizes";
  }
}

}  // namespace
