// Continuous batching: requests joining and leaving at every pass under a token budget, prefill
// chunked and mixed with decode, admission by free cache, preemption and recompute. Whatever the
// batch around it, a sequence's greedy output is the one it gets alone.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <random>
#include <thread>

#include "ballast/core/error.h"
#include "ballast/dist/thread_world.h"
#include "ballast/runtime/distributed.h"
#include "ballast/runtime/engine.h"
#include "ballast/runtime/speculative.h"
#include "fixtures.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

// 64 prompts of 1 to 300 tokens (a few of each extreme), random ids of the demo model's vocabulary.
std::vector<std::vector<int32_t>> mixed_prompts(int vocab) {
  std::mt19937 rng(2026);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 64; ++i) {
    const int len = i == 0 ? 1 : i == 1 ? 300 : i < 6 ? 1 + i : int(rng() % 300) + 1;
    std::vector<int32_t> p;
    for (int t = 0; t < len; ++t) p.push_back(int32_t(rng() % uint32_t(vocab)));
    prompts.push_back(std::move(p));
  }
  return prompts;
}

constexpr int kNewTokens = 12;

// Each prompt alone, on an engine of its own.
std::vector<std::vector<int32_t>> alone(const std::vector<std::vector<int32_t>>& prompts) {
  auto engine = test::load_engine(test::kDemoModel, 2);
  std::vector<std::vector<int32_t>> out;
  for (const auto& p : prompts) out.push_back(engine->generate({p}, kNewTokens).outputs[0]);
  return out;
}

struct Served {
  std::vector<std::vector<int32_t>> outputs;
  int64_t passes = 0, max_running = 0, preemptions = 0, mixed_passes = 0;
};

// Requests arrive four per step while the engine steps.
Served serve(const std::vector<std::vector<int32_t>>& prompts, const CacheOptions& cache) {
  auto engine = test::load_engine(test::kDemoModel, 2, {.cache = cache});
  Served s;
  s.outputs.resize(prompts.size());
  std::map<int64_t, size_t> index;
  size_t next = 0;
  for (;;) {
    for (int a = 0; a < 4 && next < prompts.size(); ++a, ++next)
      index[engine->add_request({prompts[next], {}, kNewTokens, {}})] = next;
    const int64_t prefill_before = engine->stats().prefill_tokens;
    const size_t running_before = engine->scheduler().running();
    const bool ran = engine->step();
    for (const StepOutput& o : engine->outputs()) {
      auto& out = s.outputs[index.at(o.id)];
      out.insert(out.end(), o.tokens.begin(), o.tokens.end());
    }
    if (!ran) break;
    ++s.passes;
    s.max_running = std::max<int64_t>(s.max_running, int64_t(engine->scheduler().running()));
    // A pass that prefilled while sequences already running decoded.
    if (engine->stats().prefill_tokens > prefill_before && running_before > 0) ++s.mixed_passes;
  }
  s.preemptions = engine->scheduler().preemptions();
  EXPECT_EQ(next, prompts.size());
  return s;
}

TEST(ContinuousBatching, EveryOutputEqualsThePromptAlone) {
  const auto prompts = mixed_prompts(model::load_model_config(test::kDemoModel).vocab_size);
  int64_t total = 0;
  for (const auto& p : prompts) total += int64_t(p.size());
  const auto want = alone(prompts);

  CacheOptions cache;
  cache.chunked_prefill_size = 256;  // far less than the prompts' sum: prefill is chunked
  cache.max_running_requests = 16;
  ASSERT_LT(cache.chunked_prefill_size, total);
  const Served got = serve(prompts, cache);
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(got.outputs[i], want[i]) << "prompt " << i << " of " << prompts[i].size() << " tokens";
  EXPECT_GT(got.mixed_passes, 0) << "no pass mixed prefill and decode";
  EXPECT_EQ(got.max_running, 16);
  EXPECT_EQ(got.preemptions, 0);

  // A cache of 1200 rows holds a few sequences at a time: admission waits for room, and running
  // sequences are preempted and recomputed when their next rows do not fit.
  cache.max_total_tokens = 1200;
  const Served tight = serve(prompts, cache);
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(tight.outputs[i], want[i]) << "prompt " << i << " of " << prompts[i].size() << " tokens (tight cache)";
  EXPECT_GT(tight.preemptions, 0) << "the tight cache never preempted: the test would prove little";
}

TEST(ContinuousBatching, RequestsThatCanNeverFitAreRefused) {
  CacheOptions cache;
  cache.max_total_tokens = 64;
  auto engine = test::load_engine(test::kDemoModel, 1, {.cache = cache});
  EXPECT_THROW(engine->add_request({std::vector<int32_t>(60, 1), {}, 8, {}}), Error);
  EXPECT_THROW(engine->add_request({{}, {}, 8, {}}), Error);
  EXPECT_THROW(engine->add_request({{1, 2, 99999}, {}, 8, {}}), Error);
  const int64_t id = engine->add_request({{1, 2, 3}, {}, 8, {}});
  engine->abort(id);
  EXPECT_FALSE(engine->step());  // nothing left to run, but the abort is reported
  ASSERT_EQ(engine->outputs().size(), 1u);
  EXPECT_EQ(engine->outputs()[0].reason, FinishReason::aborted);
  EXPECT_TRUE(engine->outputs()[0].finished);
  EXPECT_EQ(engine->cache().free_blocks(), engine->cache().total_blocks());
}

// Issue 16: positions past the model's trained length and non-finite sampling parameters computed
// without a word; now the engine refuses them.
TEST(ContinuousBatching, RequestsPastTheTrainedContextOrWithNonFiniteSamplingAreRefused) {
  CacheOptions cache;
  cache.max_total_tokens = 8192;  // room for it, but the demo model is trained for 4096 positions
  auto engine = test::load_engine(test::kDemoModel, 1, {.cache = cache});
  try {
    engine->add_request({std::vector<int32_t>(4000, 1), {}, 200, {}});
    ADD_FAILURE() << "accepted 4200 positions";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("context length of 4096"), std::string::npos) << e.what();
  }
  for (float bad : {std::nanf(""), -1.0f, HUGE_VALF}) {
    SamplingParams sp;
    sp.temperature = bad;
    EXPECT_THROW(engine->add_request({{1, 2}, sp, 4, {}}), Error) << bad;
  }
  SamplingParams sp;
  sp.top_p = std::nanf("");
  EXPECT_THROW(engine->add_request({{1, 2}, sp, 4, {}}), Error);
}

// EngineOptions::stop (SIGINT/SIGTERM in the CLI): generate returns what was emitted, also when
// in-process ranks see the flag at different steps.
TEST(ContinuousBatching, StopEndsGenerationWithWhatWasEmitted) {
  std::atomic<bool> stop{false};
  std::vector<runtime::DistributedResult> results(2);
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    stop.store(true);
  });
  dist::ThreadWorld world(2, std::chrono::seconds(60));
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    runtime::EngineOptions opts;
    opts.comm = &comm;
    opts.data = &world.data_plane(comm.rank());
    opts.log.level = LogLevel::Quiet;
    opts.stop = &stop;
    auto engine = test::load_engine(test::kDemoModel, 1, opts);
    results[size_t(comm.rank())] = runtime::generate_distributed(
        comm, {{1, 2, 3}, {4, 5}, {6}}, [&](const auto& mine) { return engine->generate(mine, 3000); });
  });
  stopper.join();
  for (const auto& r : results) {
    EXPECT_TRUE(r.stopped);
    ASSERT_EQ(r.outputs.size(), 3u);
    for (const auto& o : r.outputs) EXPECT_LT(o.size(), 3000u);
    EXPECT_EQ(r.outputs, results[0].outputs);
  }
}

}  // namespace

namespace {

// Decode passes as captured graphs: the same tokens as eager passes, replayed, one download per pass.
TEST(DecodeGraphs, ReplayTheSameTokensAsEagerPasses) {
  auto graphs = runtime::Engine::load(test::kDemoModel, test::capturing_backend(2), {});
  auto eager = test::load_engine(test::kDemoModel, 2, {.cuda_graphs = false});
  const std::vector<std::vector<int32_t>> prompts{{1, 2, 3, 4, 5}, {10, 20, 30}, {7, 8, 9, 10, 11, 12}};
  const auto want = eager->generate(prompts, 24).outputs;
  const kernels::Counters before = graphs->backend().counters();
  const auto got = graphs->generate(prompts, 24);
  const kernels::Counters& after = graphs->backend().counters();
  EXPECT_EQ(got.outputs, want);
  EXPECT_GT(after.graph_replays - before.graph_replays, 15) << "decode passes did not replay graphs";
  EXPECT_GT(graphs->runner().last_graph_nodes(), 10);
  EXPECT_LE(after.downloads - before.downloads, got.stats.passes) << "more than one download per pass";
  // A second round replays the graphs captured in the first (no capture, no allocation).
  const kernels::Counters warm = graphs->backend().counters();
  EXPECT_EQ(graphs->generate(prompts, 24).outputs, want);
  EXPECT_EQ(graphs->backend().counters().allocations, warm.allocations);
}

// A decode graph's pass uploads a row per sequence and its new blocks, whatever the context the
// engine is built for: an engine for 262,144-token sequences (Qwen3-Next's trained length, a server's
// default; 16,384 blocks of 16) uploads in a step what one for 256-token sequences does. (Before the
// block tables lived on the device, a graph pass uploaded each sequence's table as wide as the
// context: 64 KB a sequence a step here.)
TEST(DecodeGraphs, UploadWhatIsNewWhateverTheContext) {
  const std::vector<std::vector<int32_t>> prompts{{1, 2, 3, 4, 5}, {10, 20, 30}, {7, 8, 9, 10, 11, 12}};
  auto bytes_a_step = [&](int64_t context) {
    CacheOptions cache;
    cache.max_total_tokens = 1024;
    cache.context_length = context;
    cache.max_running_requests = 4;
    auto engine = runtime::Engine::load(test::kDemoModel, test::capturing_backend(1), {.cache = cache});
    const auto want = engine->generate(prompts, 24).outputs;  // warm: every bucket captured
    const kernels::Counters before = engine->backend().counters();
    const auto res = engine->generate(prompts, 24);
    EXPECT_EQ(res.outputs, want);
    return double(engine->backend().counters().bytes_uploaded - before.bytes_uploaded) / double(res.stats.passes);
  };
  const double small = bytes_a_step(256), large = bytes_a_step(262144);
  EXPECT_LT(large, 1.05 * small + 64) << small << " B a step at 256 tokens, " << large << " at 262,144";
  EXPECT_LT(large, 2048) << "bytes uploaded a step";
}

// Speculative decoding's passes as graphs too: verifications (every sequence S + 1 rows, padded
// with the padding sequence's verifying entries), first draft steps (every sequence padded to
// S + 1 rows, whatever its verification kept) and chained draft steps of one row per sequence:
// the tokens of eager passes, replayed.
TEST(DecodeGraphs, SpeculativePassesReplayGraphsToo) {
  auto graphs = runtime::Engine::load(test::kDemoModel, test::capturing_backend(2), {});
  auto eager = test::load_engine(test::kDemoModel, 2, {.cuda_graphs = false});
  const std::vector<std::vector<int32_t>> prompts{{1, 2, 3, 4, 5}, {10, 20, 30}, {7, 8, 9, 10, 11, 12}};
  using Kind = runtime::ModelRunner::GraphKind;
  for (int S : {1, 3}) {
    runtime::SpeculativeStats eager_st;
    const auto want = runtime::generate_speculative(*eager, prompts, 24, {.num_steps = S}, &eager_st).outputs;
    const kernels::Counters before = graphs->backend().counters();
    graphs->set_speculative_steps(S);  // a runner of its own for S (what generate_speculative does)
    const runtime::SpeculativeStats st_before = graphs->speculative_stats();
    const runtime::GenerationResult res = graphs->generate(prompts, 24);
    const auto& got = res.outputs;
    const int64_t rounds = graphs->speculative_stats().rounds - st_before.rounds;
    const int64_t emitted = graphs->speculative_stats().emitted - st_before.emitted;
    EXPECT_EQ(got, want) << "S=" << S;
    // The same drafts, so about the same acceptance (outputs are equal whatever the drafts are; a
    // chained step reading the wrong step's token accepted ~20% fewer). Padded passes may round a
    // few logits differently, hence not exactly.
    const double graphed = double(emitted) / double(rounds), plain = double(eager_st.emitted) / double(eager_st.rounds);
    EXPECT_GE(graphed, 0.95 * plain) << "S=" << S << ": acceptance length " << graphed << " with graphs, " << plain
                                     << " eagerly";
    // Each bucket runs eagerly once and is captured once; the passes after that replay.
    EXPECT_GE(graphs->backend().counters().graph_replays - before.graph_replays, 3)
        << "S=" << S << " (" << rounds << " verifications): verification passes did not replay graphs";
    // Most passes' first draft steps replay their graph (a verification counts once per sequence).
    const int64_t passes = rounds / int64_t(prompts.size());
    EXPECT_GE(graphs->runner().replays(Kind::draft_first), passes / 2) << "S=" << S << ", " << rounds << " verifications";
    // With one draft step a round is one download: its first draft step goes out from the
    // verification's verdicts on the device, and its drafts come back with them (the prefill
    // passes' drafts come back on their own).
    if (S == 1) {
      EXPECT_LE(graphs->backend().counters().downloads - before.downloads, res.stats.passes + 2)
          << res.stats.passes << " passes";
    }
    graphs->set_speculative_steps(0);
  }
}

}  // namespace
