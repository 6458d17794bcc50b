// Log-probabilities of generated tokens (Request::top_logprobs): equal to the log-softmax of the
// logits a separate prefill over prompt + output computes at each position, for plain decoding
// and for the rows a speculative verification emits, in a batch with requests that do not ask.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "ballast/runtime/engine.h"
#include "fixtures.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

struct Generated {
  std::vector<int32_t> tokens;
  std::vector<TokenLogprobs> logprobs;
};

std::vector<Generated> run(Engine& engine, const std::vector<std::vector<int32_t>>& prompts, int new_tokens,
                           const std::vector<int>& top) {
  std::map<int64_t, size_t> index;
  for (size_t i = 0; i < prompts.size(); ++i) {
    Request r{prompts[i], {}, new_tokens, {}};
    r.top_logprobs = top[i];
    index[engine.add_request(std::move(r))] = i;
  }
  std::vector<Generated> out(prompts.size());
  while (engine.step())
    for (const StepOutput& o : engine.outputs()) {
      Generated& g = out[index.at(o.id)];
      g.tokens.insert(g.tokens.end(), o.tokens.begin(), o.tokens.end());
      g.logprobs.insert(g.logprobs.end(), o.logprobs.begin(), o.logprobs.end());
    }
  return out;
}

// The log-softmax of `logits` row `t` (V wide), in double.
std::vector<double> log_softmax(const std::vector<float>& logits, int64_t t, int64_t V) {
  const float* row = logits.data() + t * V;
  double mx = row[0], sum = 0;
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(row[v]));
  for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
  std::vector<double> lp(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) lp[size_t(v)] = double(row[v]) - mx - std::log(sum);
  return lp;
}

void expect_logprobs_of_prefill(Engine& engine, const std::vector<int32_t>& prompt, const Generated& g, int top) {
  ASSERT_EQ(g.logprobs.size(), g.tokens.size());
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), g.tokens.begin(), g.tokens.end());
  const std::vector<float> logits = engine.prefill_logits(all);
  const int64_t V = engine.config().vocab_size;
  for (size_t i = 0; i < g.tokens.size(); ++i) {
    const std::vector<double> lp = log_softmax(logits, int64_t(prompt.size() + i) - 1, V);
    EXPECT_NEAR(g.logprobs[i].logprob, lp[size_t(g.tokens[i])], 1e-4) << "token " << i;
    ASSERT_EQ(g.logprobs[i].top.size(), size_t(top));
    for (int k = 0; k < top; ++k) {
      const auto [id, value] = g.logprobs[i].top[size_t(k)];
      EXPECT_NEAR(value, lp[size_t(id)], 1e-4) << "token " << i << " top " << k;
      if (k > 0) {
        EXPECT_LE(value, g.logprobs[i].top[size_t(k) - 1].second);
      }
    }
    // Greedy: the drawn token is the most likely one.
    if (top > 0) {
      EXPECT_EQ(g.logprobs[i].top[0].first, g.tokens[i]);
    }
  }
}

const std::vector<std::vector<int32_t>> kPrompts{{1, 2, 3, 4, 5}, {100, 7, 9}, {42, 43, 44, 45, 46, 47, 48, 49}};

TEST(Logprobs, DecodedTokensCarryTheModelsLogSoftmax) {
  auto engine = test::load_engine(test::kDemoModel, 2);
  const auto out = run(*engine, kPrompts, 10, {3, -1, 0});
  expect_logprobs_of_prefill(*engine, kPrompts[0], out[0], 3);
  EXPECT_TRUE(out[1].logprobs.empty()) << "a request that did not ask gets none";
  EXPECT_EQ(out[1].tokens.size(), 10u);
  expect_logprobs_of_prefill(*engine, kPrompts[2], out[2], 0);
}

TEST(Logprobs, VerifiedDraftsCarryTheTrunksLogSoftmax) {
  auto engine = test::load_engine(test::kDemoModel, 2, {.speculative_steps = 2});
  const auto out = run(*engine, kPrompts, 12, {5, 2, -1});
  EXPECT_GT(engine->speculative_stats().rounds, 0);
  EXPECT_GT(engine->speculative_stats().emitted, engine->speculative_stats().rounds) << "some drafts accepted";
  expect_logprobs_of_prefill(*engine, kPrompts[0], out[0], 5);
  expect_logprobs_of_prefill(*engine, kPrompts[1], out[1], 2);
  EXPECT_TRUE(out[2].logprobs.empty());
}

}  // namespace
