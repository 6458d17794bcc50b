// The overlap schedule (EngineOptions::overlap_schedule): a decode pass issued before the previous
// pass's tokens reach the host, reading them on the device. Whatever it changes in when tokens are
// reported, every request's tokens, log-probabilities and finish reason are those of the schedule
// that lands each pass first: greedy and seeded sampling, a stop id, lengths of 1 to 40 tokens,
// admissions while others decode, and an abort between steps (which may drop the token in flight).
#include <gtest/gtest.h>

#include <map>

#include "ballast/runtime/engine.h"
#include "fixtures.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

struct Outcome {
  std::vector<int32_t> tokens;
  std::vector<TokenLogprobs> logprobs;
  FinishReason reason = FinishReason::none;
};

struct Served {
  std::map<int, Outcome> requests;  // by the request's index
  GenerationStats stats;
  int64_t downloads = 0, free_blocks = 0, total_blocks = 0, free_slots = 0, total_slots = 0;
};

std::vector<int32_t> prompt(int n, int seed, int vocab) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(int32_t((seed * 7919 + i * 104729) % vocab));
  return p;
}

// Requests: (step it arrives at, the request). Request `aborted` is aborted after step `abort_at`.
Served serve(std::unique_ptr<kernels::Backend> backend, bool overlap, const std::vector<std::pair<int, Request>>& reqs,
          int aborted, int abort_at) {
  EngineOptions opts;
  opts.overlap_schedule = overlap;
  opts.cache.max_running_requests = 8;
  opts.cache.chunked_prefill_size = 96;
  auto engine = Engine::load(test::kDemoModel, std::move(backend), opts);
  Served run;
  std::map<int64_t, int> index;
  std::map<int, int64_t> ids;
  const int64_t downloads = engine->backend().counters().downloads;
  for (int step = 0;; ++step) {
    for (size_t i = 0; i < reqs.size(); ++i)
      if (reqs[i].first == step) {
        const int64_t id = engine->add_request(reqs[i].second);
        index[id] = int(i);
        ids[int(i)] = id;
      }
    if (step == abort_at) engine->abort(ids.at(aborted));
    const bool ran = engine->step();
    for (const StepOutput& o : engine->outputs()) {
      Outcome& out = run.requests[index.at(o.id)];
      out.tokens.insert(out.tokens.end(), o.tokens.begin(), o.tokens.end());
      out.logprobs.insert(out.logprobs.end(), o.logprobs.begin(), o.logprobs.end());
      if (o.finished) out.reason = o.reason;
    }
    if (!ran && step > reqs.back().first) break;
  }
  run.stats = engine->stats();
  run.downloads = engine->backend().counters().downloads - downloads;
  run.free_blocks = engine->cache().free_blocks();
  run.total_blocks = engine->cache().total_blocks();
  run.free_slots = engine->cache().free_slots();
  run.total_slots = engine->cache().total_slots();
  return run;
}

TEST(OverlapSchedule, EveryRequestGetsTheTokensOfTheScheduleThatLandsEachPassFirst) {
  const int V = int(model::load_model_config(test::kDemoModel).vocab_size);
  // A stop id the greedy output of prompt 2 reaches at its sixth token (or earlier).
  auto reference = test::load_engine(test::kDemoModel, 2, {.overlap_schedule = false});
  const std::vector<int32_t> p2 = prompt(40, 2, V);
  const int32_t stop = reference->generate({p2}, 8).outputs[0].at(5);
  reference.reset();

  SamplingParams sampled;
  sampled.temperature = 0.9f;
  sampled.top_p = 0.9f;
  sampled.top_k = 50;
  sampled.seed = 7;
  auto request = [&](int len, int seed, int max_new, SamplingParams sp = {}, std::vector<int32_t> stop_ids = {},
                     int top_logprobs = -1) {
    Request r{prompt(len, seed, V), sp, max_new, std::move(stop_ids)};
    r.top_logprobs = top_logprobs;
    return r;
  };
  const std::vector<std::pair<int, Request>> reqs{
      {0, request(17, 0, 20, {}, {}, 3)},         // greedy with logprobs
      {0, request(120, 1, 25, sampled)},          // sampled, prefilled in two chunks
      {0, request(40, 2, 30, {}, {stop})},        // stops at its stop id
      {0, request(9, 3, 40)},                     // aborted after step 8
      {5, request(30, 4, 10)},                    // arrive while the others decode
      {5, request(5, 5, 12, sampled, {}, 2)},
      {6, request(12, 6, 1)},                     // one token: its prefill draws it
  };
  const int aborted = 3, abort_at = 8;
  const Served off = serve(test::test_backend(2), false, reqs, aborted, abort_at);
  const Served on = serve(test::capturing_backend(2), true, reqs, aborted, abort_at);

  EXPECT_EQ(off.stats.overlapped, 0);
  EXPECT_GE(on.stats.overlapped, on.stats.passes / 2) << "the overlap schedule issued few passes ahead";
  EXPECT_LE(on.downloads, on.stats.passes) << "more than one download per pass";
  ASSERT_EQ(on.requests.size(), reqs.size());
  ASSERT_EQ(off.requests.size(), reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Outcome &a = on.requests.at(int(i)), &b = off.requests.at(int(i));
    EXPECT_EQ(a.reason, b.reason) << "request " << i;
    if (int(i) == aborted) {
      // The pass in flight when the abort came may have drawn a token that is then dropped.
      EXPECT_EQ(a.reason, FinishReason::aborted);
      ASSERT_LE(a.tokens.size(), b.tokens.size());
      EXPECT_GE(a.tokens.size() + 1, b.tokens.size());
      EXPECT_EQ(a.tokens, std::vector<int32_t>(b.tokens.begin(), b.tokens.begin() + ptrdiff_t(a.tokens.size())));
      continue;
    }
    EXPECT_EQ(a.tokens, b.tokens) << "request " << i;
    ASSERT_EQ(a.logprobs.size(), b.logprobs.size()) << "request " << i;
    for (size_t t = 0; t < a.logprobs.size(); ++t) {
      EXPECT_NEAR(a.logprobs[t].logprob, b.logprobs[t].logprob, 1e-4) << "request " << i << " token " << t;
      ASSERT_EQ(a.logprobs[t].top.size(), b.logprobs[t].top.size());
      for (size_t k = 0; k < a.logprobs[t].top.size(); ++k)
        EXPECT_EQ(a.logprobs[t].top[k].first, b.logprobs[t].top[k].first) << "request " << i << " token " << t;
    }
  }
  // The workload did what it claims: a stop before the length, a request of one token, lengths reached.
  EXPECT_EQ(on.requests.at(2).reason, FinishReason::stop);
  EXPECT_LT(on.requests.at(2).tokens.size(), 30u);
  EXPECT_EQ(on.requests.at(6).tokens.size(), 1u);
  EXPECT_EQ(on.requests.at(0).tokens.size(), 20u);
  EXPECT_EQ(on.requests.at(0).logprobs.size(), 20u);
  // The row a stopped sequence ran past its end gave its blocks and slot back with the rest.
  EXPECT_EQ(on.free_blocks, on.total_blocks);
  EXPECT_EQ(on.free_slots, on.total_slots);
}

}  // namespace
