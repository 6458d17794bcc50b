// The MTP head against the PyTorch reference (tools/mtp_reference.py), speculative decoding's
// losslessness, and the MTP layer as an expert domain of its own (the seed PR's bug).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <mutex>

#include "ballast/dist/thread_world.h"
#include "ballast/io/safetensors.h"
#include "ballast/runtime/distributed.h"
#include "ballast/runtime/engine.h"
#include "ballast/runtime/sampler.h"
#include "ballast/runtime/speculative.h"
#include "fixtures.h"

namespace fs = std::filesystem;
using namespace ballast;

namespace {

using namespace ballast::test;

std::vector<float> host(kernels::Ops& ops, const Tensor& t) {
  std::vector<float> v(size_t(t.numel()));
  ops.to_host(t, v.data());
  return v;
}

std::vector<std::vector<int32_t>> prompts_of(const std::string& fixture) {
  auto ref = io::SafetensorsFile::open(kFixtures / fixture / "reference.safetensors");
  auto a = values<int32_t>(ref->get("prompt_ids")), b = values<int32_t>(ref->get("short_prompt_ids"));
  return {a, b, {a.begin() + 10, a.begin() + 50}, {a.begin() + 3, a.begin() + 5}};
}

class Mtp : public ::testing::TestWithParam<std::string> {};

TEST_P(Mtp, PrefillAndChainedDraftsMatchReference) {
  auto engine = runtime::Engine::load(kFixtures / GetParam(), {.threads = 2});
  auto& model = engine->model();
  auto& ops = engine->ops();
  ASSERT_TRUE(model.has_mtp());
  auto ref = io::SafetensorsFile::open(kFixtures / GetParam() / "mtp_reference.safetensors");
  const Tensor hidden = ref->get("hidden");
  const auto tokens = values<int32_t>(ref->get("mtp_tokens"));
  const int64_t T = hidden.dim(0), H = hidden.dim(1), V = engine->config().vocab_size;

  // The trunk's hidden states after model.norm, as the head takes them.
  auto prompt = values<int32_t>(io::SafetensorsFile::open(kFixtures / GetParam() / "reference.safetensors")->get("prompt_ids"));
  model::SequenceState st = model.new_sequence(T + 8);
  model::SeqChunk c{&st, prompt, true};
  auto tr = model.forward(std::span<const model::SeqChunk>(&c, 1));
  EXPECT_LE(rel_max_err(host(ops, tr.hidden), values<float>(hidden)), 1e-4);

  // One MTP prefill over the pairs (h_t, x_{t+1}) at positions t + 1.
  model::SequenceState ms = model.new_mtp_sequence(T + 8);
  model::MtpChunk mc{&ms, tokens, hidden.rows(0, T - 1), 1, true};
  auto r = model.mtp_forward(std::span<const model::MtpChunk>(&mc, 1));
  EXPECT_LE(rel_max_err(host(ops, r.logits), values<float>(ref->get("mtp_logits"))), 1e-4);

  // Chained drafts after the prompt: (h_{T-1}, trunk's next token), then the head's own output.
  const auto chain_tokens = values<int32_t>(ref->get("chain_tokens"));
  const auto chain_logits = values<float>(ref->get("chain_logits"));
  std::vector<float> trunk_last = host(ops, tr.logits);
  int32_t tok = runtime::argmax(std::span<const float>(trunk_last).subspan(size_t((T - 1) * V), size_t(V)));
  Tensor h = Tensor::zeros({1, H});
  ops.copy(hidden.rows(T - 1, T), h);
  for (size_t k = 0; k < chain_tokens.size(); ++k) {
    model::MtpChunk step{&ms, std::span<const int32_t>(&tok, 1), h, T + int64_t(k), false};
    auto d = model.mtp_forward(std::span<const model::MtpChunk>(&step, 1));
    const auto got = host(ops, d.logits);
    const std::vector<float> want(chain_logits.begin() + long(k * V), chain_logits.begin() + long((k + 1) * V));
    EXPECT_LE(rel_max_err(got, want), 1e-4) << "chain step " << k;
    tok = runtime::argmax(got);
    EXPECT_EQ(tok, chain_tokens[k]) << "chain step " << k;
    h = Tensor::zeros({1, H});
    ops.copy(d.hidden, h);
  }
}

TEST_P(Mtp, SpeculativeGreedyEqualsGreedy) {
  auto engine = runtime::Engine::load(kFixtures / GetParam(), {.threads = 2});
  const auto prompts = prompts_of(GetParam());
  const auto want = engine->generate(prompts, 20).outputs;
  for (int steps : {1, 2, 3}) {
    runtime::SpeculativeStats st;
    auto got = runtime::generate_speculative(*engine, prompts, 20, {.num_steps = steps}, &st);
    EXPECT_EQ(got.outputs, want) << "steps " << steps;
    EXPECT_GE(st.acceptance_length(), 1.0);
    EXPECT_LE(st.acceptance_length(), double(steps + 1));
  }
}

// Speculation on G thread ranks with redundant experts and rebalancing of both domains.
struct EpSpecRun {
  std::vector<std::vector<int32_t>> outputs;
  int trunk_rebalances = 0, mtp_rebalances = 0;
};

EpSpecRun run_ep_speculative(const std::string& fixture, const std::vector<std::vector<int32_t>>& prompts, int G,
                             int steps, int interval) {
  EpSpecRun out;
  std::mutex mu;
  dist::run_ranks(G, [&](dist::Communicator& comm) {
    runtime::EngineOptions opts{.threads = 1, .comm = &comm};
    opts.log.level = LogLevel::Quiet;
    const int R = redundant_for(model::load_model_config(kFixtures / fixture).num_experts, G, G);
    opts.ep.mtp.emplace();
    for (auto* d : {&opts.ep.trunk, &*opts.ep.mtp}) {
      d->redundant = R;
      d->dispatch = eplb::Dispatch::balanced;
      d->rebalance.enabled = interval > 0;
      d->rebalance.interval = interval;
    }
    auto engine = runtime::Engine::load(kFixtures / fixture, opts);
    auto r = runtime::generate_distributed(comm, prompts, [&](const auto& mine) {
      return steps > 0 ? runtime::generate_speculative(*engine, mine, 16, {.num_steps = steps})
                       : engine->generate(mine, 16);
    });
    std::lock_guard lk(mu);
    if (comm.rank() == 0) {
      out.outputs = r.outputs;
      out.trunk_rebalances = int(engine->trunk_rebalancer()->events().size());
      out.mtp_rebalances = engine->mtp().rebalancer ? int(engine->mtp().rebalancer->events().size()) : 0;
    }
  });
  return out;
}

TEST_P(Mtp, SpeculativeUnderExpertParallelismWithRebalancesIsLossless) {
  const auto prompts = prompts_of(GetParam());
  auto engine = runtime::Engine::load(kFixtures / GetParam(), {.threads = 2});
  const auto want = engine->generate(prompts, 16).outputs;
  for (int G : {1, 4}) {
    auto got = run_ep_speculative(GetParam(), prompts, G, 2, /*interval=*/2);
    EXPECT_EQ(got.outputs, want) << "G=" << G;
    EXPECT_GT(got.trunk_rebalances, 0);
    EXPECT_GT(got.mtp_rebalances, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Mtp, ::testing::ValuesIn(fixtures_with("mtp_reference.safetensors")), [](const auto& info) { return info.param; });

// The seed PR's bug, made impossible by design and caught by this test when reintroduced.
struct IsolationResult {
  double trunk_counts = 0, trunk_expected = 0;  // sum of the trunk recorder's counts vs k x trunk tokens
  double mtp_counts = 0;
  std::vector<float> mtp_before, mtp_after;      // draft logits for fixed inputs around a trunk rebalance
  bool trunk_layer0_moved = false;
};

IsolationResult isolation_run(bool broken_wiring, int steps) {
  const std::string fixture = "qwen3_next_a";
  IsolationResult out;
  std::mutex mu;
  dist::run_ranks(2, [&](dist::Communicator& comm) {
    runtime::EngineOptions opts{.threads = 1, .comm = &comm};
    opts.log.level = LogLevel::Quiet;
    opts.ep.mtp.emplace();
    for (auto* d : {&opts.ep.trunk, &*opts.ep.mtp}) {
      d->redundant = 2;
      d->recorder_window = 100000;
    }
    opts.ep.trunk.rebalance.enabled = true;
    opts.ep.trunk.rebalance.interval = 3;
    auto engine = runtime::Engine::load(kFixtures / fixture, opts);
    if (broken_wiring) engine->mtp().runner->wire_to_foreign_tables_for_test(*engine->trunk_domain());
    engine->mtp().domain->recorder.start();
    auto& ops = engine->ops();
    const auto k = engine->config().num_experts_per_tok;

    // Draft logits for fixed inputs (the reference's hidden states and tokens), rank 0's rows.
    auto ref = io::SafetensorsFile::open(kFixtures / fixture / "mtp_reference.safetensors");
    const Tensor hidden = ref->get("hidden");
    const auto tokens = values<int32_t>(ref->get("mtp_tokens"));
    auto draft_logits = [&]() {
      model::SequenceState ms = engine->model().new_mtp_sequence(int64_t(tokens.size()));
      std::vector<model::MtpChunk> chunks;
      if (comm.rank() == 0) chunks.push_back({&ms, tokens, hidden.rows(0, int64_t(tokens.size())), 1, true});
      auto r = engine->model().mtp_forward(chunks);  // no end-of-pass: keep the counts out of it
      return host(ops, r.logits);
    };
    const auto before = draft_logits();

    const auto prompts = prompts_of(fixture);
    runtime::SpeculativeStats st;
    auto res = runtime::generate_distributed(comm, prompts, [&](const auto& mine) {
      return runtime::generate_speculative(*engine, mine, 16, {.num_steps = steps}, &st);
    });
    const auto after = draft_logits();

    // Trunk tokens: every prefill token and every verified token (S + 1 per sequence and round).
    std::vector<int64_t> counted{res.stats.prefill_tokens, st.rounds};  // prefill already summed over ranks
    comm.all_reduce_sum(std::span<int64_t>(counted).subspan(1));
    eplb::LoadTrace trunk = engine->trunk_domain()->recorder.dump_window();
    eplb::LoadTrace mtp = engine->mtp().domain->recorder.dump_window();
    comm.all_reduce_sum(std::span<double>(trunk.count));
    comm.all_reduce_sum(std::span<double>(mtp.count));
    std::lock_guard lk(mu);
    if (comm.rank() != 0) return;
    // Layer 0 of the trunk (a MoE layer in this fixture) must carry exactly k counts per trunk token.
    for (int t = 0; t < trunk.passes; ++t)
      for (int e = 0; e < trunk.experts; ++e) out.trunk_counts += trunk.at(t, 0)[e];
    out.trunk_expected = double(k) * double(counted[0] + counted[1] * (steps + 1));
    for (double c : mtp.count) out.mtp_counts += c;
    out.mtp_before = before;
    out.mtp_after = after;
    const auto& pl = engine->trunk_domain()->placement;
    out.trunk_layer0_moved = !std::equal(pl.layer(0).begin(), pl.layer(0).end(),
                                         eplb::Placement::trivial(pl.layers, pl.logical, pl.physical, pl.ranks).layer(0).begin());
  });
  return out;
}

TEST(MtpDomain, DraftsNeverTouchTrunkStatisticsNorReadTrunkTables) {
  for (int steps : {1, 3}) {
    auto r = isolation_run(false, steps);
    ASSERT_TRUE(r.trunk_layer0_moved) << "the trunk was never rebalanced: the test would prove nothing";
    EXPECT_EQ(r.trunk_counts, r.trunk_expected) << "steps " << steps << ": trunk statistics include draft tokens";
    EXPECT_GT(r.mtp_counts, 0) << "the MTP domain recorded nothing";
    EXPECT_LE(rel_max_err(r.mtp_after, r.mtp_before), 1e-6) << "draft logits changed with the trunk's placement";
  }
}

TEST(MtpDomain, BrokenWiringToTrunkTablesIsCaught) {
  auto r = isolation_run(true, 2);
  ASSERT_TRUE(r.trunk_layer0_moved);
  // Wired to the trunk's layer-0 tables, drafts pollute the trunk's counts and compute with the
  // wrong experts once the trunk's placement moves: both checks above fail.
  EXPECT_NE(r.trunk_counts, r.trunk_expected);
  EXPECT_GT(rel_max_err(r.mtp_after, r.mtp_before), 1e-3);
}

}  // namespace
