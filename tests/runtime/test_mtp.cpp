// The MTP head against the PyTorch reference (tools/mtp_reference.py), speculative decoding's
// losslessness, and the MTP layer as an expert domain of its own (the seed PR's bug).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <numeric>
#include <optional>

#include "ballast/dist/thread_world.h"
#include "ballast/io/safetensors.h"
#include "ballast/runtime/distributed.h"
#include "ballast/runtime/engine.h"
#include "ballast/kernels/sampling.h"
#include "ballast/runtime/speculative.h"
#include "fixtures.h"

namespace fs = std::filesystem;
using namespace ballast;

namespace {

using namespace ballast::test;

std::vector<std::vector<int32_t>> prompts_of(const std::string& fixture) {
  auto ref = io::SafetensorsFile::open(kFixtures / fixture / "reference.safetensors");
  auto a = values<int32_t>(ref->get("prompt_ids")), b = values<int32_t>(ref->get("short_prompt_ids"));
  return {a, b, {a.begin() + 10, a.begin() + 50}, {a.begin() + 3, a.begin() + 5}};
}

class Mtp : public ::testing::TestWithParam<std::string> {};

TEST_P(Mtp, PrefillAndChainedDraftsMatchReference) {
  auto engine = load_engine(kFixtures / GetParam(), 2);
  ASSERT_TRUE(engine->model().has_mtp());
  auto& backend = engine->backend();
  auto& cache = engine->cache();
  auto& runner = engine->runner();
  using Entry = runtime::ModelRunner::Entry;
  using runtime::ModelRunner;
  auto ref = io::SafetensorsFile::open(kFixtures / GetParam() / "mtp_reference.safetensors");
  const Tensor hidden = ref->get("hidden");
  const auto tokens = values<int32_t>(ref->get("mtp_tokens"));
  const int64_t T = hidden.dim(0), H = hidden.dim(1), V = engine->config().vocab_size;

  // The trunk's hidden states after model.norm, as the head takes them.
  auto prompt = values<int32_t>(io::SafetensorsFile::open(kFixtures / GetParam() / "reference.safetensors")->get("prompt_ids"));
  runtime::CacheEntry st;
  ASSERT_TRUE(cache.allocate(st));
  ASSERT_TRUE(cache.append(st, {.rows = T, .headroom = 8}));
  const Entry c{&st, prompt, ModelRunner::Logits::all};
  auto tr = runner.forward(std::span<const Entry>(&c, 1));
  const std::vector<float> trunk_last = download(backend, tr.logits);
  EXPECT_LE(rel_max_err(download(backend, tr.hidden), values<float>(hidden)), 1e-4);

  // One MTP prefill over the pairs (h_t, x_{t+1}) at positions t + 1, from the reference's states.
  Tensor source = backend.alloc({T, H}, DType::F32);
  backend.upload(hidden.raw(), source);
  std::vector<int32_t> rows(size_t(T - 1));
  std::iota(rows.begin(), rows.end(), 0);
  ASSERT_TRUE(cache.append(st, {.mtp_rows = T - 1}));
  const Entry mc{&st, tokens, ModelRunner::Logits::all, false, rows};
  auto r = runner.mtp_forward(std::span<const Entry>(&mc, 1), source);
  EXPECT_LE(rel_max_err(download(backend, r.logits), values<float>(ref->get("mtp_logits"))), 1e-4);

  // Chained drafts after the prompt: (h_{T-1}, trunk's next token), then the head's own output.
  const auto chain_tokens = values<int32_t>(ref->get("chain_tokens"));
  const auto chain_logits = values<float>(ref->get("chain_logits"));
  int32_t tok = kernels::argmax(std::span<const float>(trunk_last).subspan(size_t((T - 1) * V), size_t(V)));
  std::vector<int32_t> row{int32_t(T - 1)};
  Tensor h = source;
  for (size_t k = 0; k < chain_tokens.size(); ++k) {
    ASSERT_TRUE(cache.append(st, {.mtp_rows = 1}));
    const Entry step{&st, std::span<const int32_t>(&tok, 1), ModelRunner::Logits::last, false, row};
    auto d = runner.mtp_forward(std::span<const Entry>(&step, 1), h);
    const auto got = download(backend, d.logits);
    const std::vector<float> want(chain_logits.begin() + long(k * V), chain_logits.begin() + long((k + 1) * V));
    EXPECT_LE(rel_max_err(got, want), 1e-4) << "chain step " << k;
    tok = kernels::argmax(got);
    EXPECT_EQ(tok, chain_tokens[k]) << "chain step " << k;
    h = d.hidden;
    row = {0};
  }
  cache.release(st);
}

TEST_P(Mtp, SpeculativeGreedyEqualsGreedy) {
  auto engine = load_engine(kFixtures / GetParam(), 2);
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

// The same with graphs (decode, verification and draft passes replayed; on the CPU over a backend
// that records graphs as CUDA does): one draft step goes out before the verification's download.
TEST_P(Mtp, SpeculativeGreedyEqualsGreedyUnderGraphs) {
  const auto prompts = prompts_of(GetParam());
  const auto want = load_engine(kFixtures / GetParam(), 2)->generate(prompts, 20).outputs;
  auto engine = runtime::Engine::load(kFixtures / GetParam(), capturing_backend(2), {});
  EXPECT_EQ(engine->generate(prompts, 20).outputs, want) << "plain decoding";
  using Kind = runtime::ModelRunner::GraphKind;
  EXPECT_GT(engine->runner().replays(Kind::decode), 0);
  for (int steps : {1, 2, 3}) {
    engine->set_speculative_steps(steps);  // kept after the run: the runner's counts stay
    auto got = runtime::generate_speculative(*engine, prompts, 20, {.num_steps = steps});
    EXPECT_EQ(got.outputs, want) << "steps " << steps;
    const auto& runner = engine->runner();
    EXPECT_GT(runner.replays(Kind::verify), 0) << "steps " << steps;
    EXPECT_GT(runner.replays(steps == 1 ? Kind::draft_first : Kind::draft_chained), 0) << "steps " << steps;
  }
}

// Speculation on G thread ranks with redundant experts and rebalancing of both domains. graphs:
// on the CPU, over a backend that records graphs as CUDA does and the thread plane on it, so that
// the ranks' passes are group graphs as on a GPU (where they are anyway).
struct EpSpecRun {
  std::vector<std::vector<int32_t>> outputs;
  int trunk_rebalances = 0, mtp_rebalances = 0;
  // Group graph passes of each kind, summed over ranks: verifications, draft steps, empty parts.
  int64_t verify_replays = 0, draft_replays = 0, idle_replays = 0;
  eplb::LoadTrace trunk_load, mtp_load;  // the domains' recorded windows (every rank's load), rank 0's
  int64_t rounds = 0, emitted = 0;       // speculation, summed over ranks
};

EpSpecRun run_ep_speculative(const std::string& fixture, const std::vector<std::vector<int32_t>>& prompts, int G,
                             int steps, int interval, bool graphs = false) {
  EpSpecRun out;
  std::mutex mu;
  dist::ThreadWorld world(G);
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    GraphRank rank = graphs ? graph_rank(world, comm.rank()) : GraphRank{test_backend(1)};
    runtime::EngineOptions opts{.comm = &comm, .data = &rank.data(world, comm.rank())};
    opts.log.level = LogLevel::Quiet;
    const int R = redundant_for(model::load_model_config(kFixtures / fixture).num_experts, G, G);
    opts.ep.mtp.emplace();
    for (auto* d : {&opts.ep.trunk, &*opts.ep.mtp}) {
      d->redundant = R;
      d->dispatch = eplb::Dispatch::balanced;
      d->rebalance.enabled = interval > 0;
      d->rebalance.interval = interval;
    }
    auto engine = runtime::Engine::load(kFixtures / fixture, std::move(rank.backend), opts);
    if (steps > 0) engine->set_speculative_steps(steps);  // kept after the run: the runner's counts stay
    auto r = runtime::generate_distributed(comm, prompts, [&](const auto& mine) {
      return steps > 0 ? runtime::generate_speculative(*engine, mine, 16, {.num_steps = steps})
                       : engine->generate(mine, 16);
    });
    rank.plane.reset();  // its queue is the engine's backend's
    std::lock_guard lk(mu);
    using Kind = runtime::ModelRunner::GraphKind;
    const auto& runner = engine->runner();
    out.verify_replays += runner.replays(Kind::verify);
    for (Kind k : {Kind::draft_from_trunk, Kind::draft_chained, Kind::draft_first}) out.draft_replays += runner.replays(k);
    out.idle_replays += runner.replays(Kind::idle) + runner.replays(Kind::draft_idle);
    out.rounds += engine->speculative_stats().rounds;
    out.emitted += engine->speculative_stats().emitted;
    if (comm.rank() == 0) {
      out.outputs = r.outputs;
      out.trunk_rebalances = int(engine->trunk_ep()->rebalancer.events().size());
      out.mtp_rebalances = engine->mtp_ep() ? int(engine->mtp_ep()->rebalancer.events().size()) : 0;
      out.trunk_load = engine->trunk_ep()->domain.recorder.dump_window();
      if (engine->mtp_ep()) out.mtp_load = engine->mtp_ep()->domain.recorder.dump_window();
    }
  });
  return out;
}

TEST_P(Mtp, SpeculativeUnderExpertParallelismWithRebalancesIsLossless) {
  const auto prompts = prompts_of(GetParam());
  auto engine = load_engine(kFixtures / GetParam(), 2);
  const auto want = engine->generate(prompts, 16).outputs;
  for (int G : {1, 4}) {
    auto got = run_ep_speculative(GetParam(), prompts, G, 2, /*interval=*/2);
    EXPECT_EQ(got.outputs, want) << "G=" << G;
    EXPECT_GT(got.trunk_rebalances, 0);
    EXPECT_GT(got.mtp_rebalances, 0);
  }
}

// The same with every rank's verification and draft passes as one group graph, replayed from rank 0
// (runtime/graph_group.h): lossless too (one draft step: issued before the verification's
// download, as all the ranks agree), and both domains record the eager run's load: the rows that
// only pad a graph (padding sequences, a first draft step's rows past what was kept) go to no
// expert. Except that an early first draft step also drafts for the sequences its verification
// finishes (the host learns of it after): up to S + 1 rows once a sequence, k choices each. Four prompts over G = 2 and 4, and two over G = 4: ranks
// 2 and 3 have no sequences and take part in the others' graphs with empty parts.
TEST_P(Mtp, SpeculativeUnderExpertParallelismAsGroupGraphsIsLossless) {
  const auto four = prompts_of(GetParam());
  const std::vector<std::vector<int32_t>> two(four.begin(), four.begin() + 2);
  auto engine = load_engine(kFixtures / GetParam(), 2);
  const auto want = engine->generate(four, 16).outputs;
  for (const auto* prompts : {&four, &two})
    for (int G : {2, 4})
      for (int steps : {1, 2}) {
        if (prompts == &two && G == 2) continue;
        const std::string where = fmt::format("{} prompts, G={}, steps={}", prompts->size(), G, steps);
        auto got = run_ep_speculative(GetParam(), *prompts, G, steps, /*interval=*/2, /*graphs=*/true);
        EXPECT_EQ(got.outputs, std::vector(want.begin(), want.begin() + std::ssize(*prompts))) << where;
        const auto eager = run_ep_speculative(GetParam(), *prompts, G, steps, /*interval=*/2, /*graphs=*/false);
        EXPECT_EQ(got.trunk_load.count, eager.trunk_load.count) << where << ": the trunk's load";
        // The same drafts: the same rounds and tokens (outputs are lossless whatever the drafts are).
        EXPECT_EQ(got.rounds, eager.rounds) << where;
        EXPECT_EQ(got.emitted, eager.emitted) << where;
        if (steps > 1) {
          EXPECT_EQ(got.mtp_load.count, eager.mtp_load.count) << where << ": the MTP head's load";
        } else {
          const double k = model::load_model_config(kFixtures / GetParam()).num_experts_per_tok;
          double extra = 0;
          for (size_t i = 0; i < got.mtp_load.count.size() && i < eager.mtp_load.count.size(); ++i)
            extra += got.mtp_load.count[i] - eager.mtp_load.count[i];
          ASSERT_EQ(got.mtp_load.count.size(), eager.mtp_load.count.size()) << where;
          EXPECT_GE(extra, 0) << where;
          EXPECT_LE(extra, k * (steps + 1) * double(prompts->size())) << where << ": the MTP head's load";
        }
        EXPECT_GT(got.verify_replays, 0) << where << ": no verification was a graph";
        EXPECT_GT(got.draft_replays, 0) << where << ": no draft step was a graph";
        EXPECT_GT(got.trunk_rebalances, 0) << where;
        EXPECT_GT(got.mtp_rebalances, 0) << where;
        if (prompts == &two) {
          EXPECT_GT(got.idle_replays, 0) << where << ": no rank took part idle";
        }
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
  dist::ThreadWorld world(2);
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    dist::DataPlane& data = world.data_plane(comm.rank());
    runtime::EngineOptions opts{.comm = &comm, .data = &data};
    opts.log.level = LogLevel::Quiet;
    opts.ep.mtp.emplace();
    for (auto* d : {&opts.ep.trunk, &*opts.ep.mtp}) {
      d->redundant = 2;
      d->recorder_window = 100000;
    }
    opts.ep.trunk.rebalance.enabled = true;
    opts.ep.trunk.rebalance.interval = 3;
    auto engine = load_engine(kFixtures / fixture, 1, opts);
    auto& trunk_ep = *engine->trunk_ep();
    auto& mtp_ep = *engine->mtp_ep();
    // The broken wiring: the MTP layer dispatches through the trunk's layer-0 tables and counts into
    // the trunk's load, computing with its own slots.
    std::optional<moe::ExpertParallelRunner> broken;
    if (broken_wiring) {
      broken.emplace(engine->backend(), trunk_ep.tables, mtp_ep.slots, trunk_ep.load, *engine->data_plane(),
                     engine->runner().limits().max_tokens);
      engine->model().set_mtp_moe(*broken);
    }
    mtp_ep.domain.recorder.start();
    const auto k = engine->config().num_experts_per_tok;

    // Draft logits for fixed inputs (the reference's hidden states and tokens), rank 0's rows.
    auto ref = io::SafetensorsFile::open(kFixtures / fixture / "mtp_reference.safetensors");
    const Tensor hidden = ref->get("hidden");
    const auto tokens = values<int32_t>(ref->get("mtp_tokens"));
    const int64_t n = int64_t(tokens.size());
    Tensor source = engine->backend().alloc(hidden.shape(), DType::F32);
    engine->backend().upload(hidden.raw(), source);
    std::vector<int32_t> rows(static_cast<size_t>(n));
    std::iota(rows.begin(), rows.end(), 0);
    auto draft_logits = [&]() {
      // One MTP pass of its own (no end of pass: keeps the counts out of the window).
      runtime::CacheEntry ms;
      std::vector<runtime::ModelRunner::Entry> entries;
      if (comm.rank() == 0) {
        EXPECT_TRUE(engine->cache().allocate(ms));
        EXPECT_TRUE(engine->cache().append(ms, {.mtp_rows = n}));
        entries.push_back({&ms, tokens, runtime::ModelRunner::Logits::all, false, rows});
      }
      auto r = engine->runner().mtp_forward(entries, source);
      auto logits = download(engine->backend(), r.logits);
      engine->cache().release(ms);
      return logits;
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
    // Every pass's load is summed over ranks before it is recorded: each rank's window holds it all.
    const eplb::LoadTrace trunk = trunk_ep.domain.recorder.dump_window();
    const eplb::LoadTrace mtp = mtp_ep.domain.recorder.dump_window();
    std::lock_guard lk(mu);
    if (comm.rank() != 0) return;
    // Layer 0 of the trunk (a MoE layer in this fixture) must carry exactly k counts per trunk token.
    for (int t = 0; t < trunk.passes; ++t)
      for (int e = 0; e < trunk.experts; ++e) out.trunk_counts += trunk.at(t, 0)[e];
    out.trunk_expected = double(k) * double(counted[0] + counted[1] * (steps + 1));
    for (double c : mtp.count) out.mtp_counts += c;
    out.mtp_before = before;
    out.mtp_after = after;
    const auto& pl = trunk_ep.domain.placement;
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
