// Expert parallelism on the fixtures: ranks as threads, every dispatch policy, redundant slots and
// live rebalances. Placement never changes the output.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "ballast/dist/thread_world.h"
#include "ballast/eplb/metrics.h"
#include "ballast/io/checkpoint.h"
#include "ballast/io/safetensors.h"
#include "ballast/model/weights.h"
#include "ballast/runtime/distributed.h"
#include "ballast/runtime/engine.h"
#include "fixtures.h"
#include "support/failing_data_plane.h"
#include "support/recording_backend.h"
#ifdef BALLAST_HAS_NCCL
#include "ballast/dist/nccl_data_plane.h"
#endif

namespace fs = std::filesystem;
using namespace ballast;

namespace {

using namespace ballast::test;

// The two reference prompts and three more cut from them: five prompts of different lengths.
std::vector<std::vector<int32_t>> ep_prompts_of(const std::string& fixture) {
  auto ref = io::SafetensorsFile::open(kFixtures / fixture / "reference.safetensors");
  auto a = ids(*ref, "prompt_ids"), b = ids(*ref, "short_prompt_ids");
  return {a, b, {a.begin() + 10, a.begin() + 50}, {a.begin() + 3, a.begin() + 5}, {b.rbegin(), b.rend()}};
}

struct EpRun {
  std::vector<std::vector<int32_t>> outputs;      // per prompt
  std::vector<moe::RebalanceEvent> events;        // rank 0's
  std::vector<double> balancedness;               // rank 0's per-pass figures
  eplb::Placement final_placement;
  bool slots_hold_their_experts = true;
  int64_t graph_replays = 0;  // rank 0's backend's
  eplb::LoadTrace load;       // the trunk's recorded window (every rank's load), rank 0's
  std::vector<std::vector<std::vector<int32_t>>> tokens;  // rank 0's own routed slots, per_token
};

// Runs greedy generation of `prompts` on G thread ranks (prompt i on rank i % G). fail: whether a
// rank's weight transfers are to fail (after they were made). plane: the data plane the engine is
// given, made over the rank's backend and thread plane (else the thread plane itself, and the
// engine's choice where that cannot move the backend's buffers: its plane on the shared device).
using DevicePlane =
    std::function<std::unique_ptr<dist::DataPlane>(dist::Communicator&, kernels::Backend&, dist::DataPlane& threads)>;
// How a rank's test backend is wrapped (none: as it is).
using WrapBackend = std::function<std::unique_ptr<kernels::Backend>(std::unique_ptr<kernels::Backend>)>;
// More engine options (the trunk's load is recorded in every run).
using Configure = std::function<void(runtime::EngineOptions&)>;
EpRun run_ep(const std::string& fixture, const std::vector<std::vector<int32_t>>& prompts, int G, int redundant,
             eplb::Dispatch dispatch, int rebalance_every, int max_new = 12, std::function<bool(int rank)> fail = {},
             const DevicePlane& plane = {}, const WrapBackend& wrap = {}, const Configure& configure = {}) {
  EpRun out;
  std::mutex mu;
  dist::ThreadWorld world(G);
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    test::FailingDataPlane failing(world.data_plane(comm.rank()),
                                   [&, r = comm.rank()](auto) { return fail && fail(r); });
    std::unique_ptr<kernels::Backend> backend = test_backend(1);
    if (wrap) backend = wrap(std::move(backend));
    std::unique_ptr<dist::DataPlane> given = plane ? plane(comm, *backend, failing) : nullptr;
    runtime::EngineOptions opts;
    opts.comm = &comm;
    opts.data = given ? given.get() : &failing;
    opts.log.level = LogLevel::Quiet;
    opts.ep.trunk.redundant = redundant;
    opts.ep.trunk.dispatch = dispatch;
    opts.ep.trunk.rebalance.enabled = rebalance_every > 0;
    opts.ep.trunk.rebalance.interval = rebalance_every;
    opts.ep.trunk.rebalance.layers_per_chunk = 1;
    if (configure) configure(opts);
    auto engine = runtime::Engine::load(kFixtures / fixture, std::move(backend), opts);
    engine->trunk_ep()->domain.recorder.start();
    // In-process ranks on a GPU: the engine's own choice is the thread plane on that GPU.
    if (!given && engine->backend().device() != Device::CPU) {
      EXPECT_EQ(engine->ep_transport(), "device to device on the GPU the ranks share (the in-process plane on the device)");
    }
    if (!given && engine->backend().device() == Device::CPU) {
      EXPECT_EQ(engine->ep_transport(), "by the given data plane");
    }
    auto res = runtime::generate_distributed(comm, prompts, [&](const auto& mine) {
      return engine->generate(mine, max_new);
    });

    // Every slot must hold exactly the weights of the logical expert its placement names (as the
    // checkpoint has them), and the model no copy of its own (the experts' memory is taken once).
    const auto& trunk = *engine->trunk_ep();
    const auto& pl = trunk.domain.placement;
    const int K = pl.slots_per_rank();
    const io::Checkpoint ckpt = io::Checkpoint::open(kFixtures / fixture);
    const model::ModelWeights host = model::bind_weights(model::load_model_config(kFixtures / fixture), ckpt);
    std::vector<const model::MoeWeights*> layers;
    for (const auto& l : host.layers)
      if (l.ffn == model::FfnType::Moe) layers.push_back(&l.moe);
    for (const auto& l : engine->model().weights().layers) EXPECT_TRUE(l.moe.experts.empty());
    auto bytes = [](const Tensor& t) {
      const auto* p = static_cast<const std::byte*>(t.raw());
      return std::vector<std::byte>(p, p + t.nbytes());
    };
    bool exact = true;
    for (int l = 0; l < pl.layers; ++l)
      for (int s = 0; s < K; ++s) {
        const auto& want = layers[size_t(l)]->experts[size_t(pl.layer(l)[comm.rank() * K + s])];
        const auto& have = trunk.slots.weights(l, s);
        for (auto [a, b] : {std::pair{&want.gate, &have.gate}, {&want.up, &have.up}, {&want.down, &have.down}}) {
          exact = exact && bytes(*a) == download_bytes(engine->backend(), *b);
          // FP8 experts (the *_fp8 fixtures) move with their block scales.
          if (a->dtype() == DType::F8_E4M3_B128)
            exact = exact && b->dtype() == DType::F8_E4M3_B128 &&
                    bytes(a->scales()) == download_bytes(engine->backend(), b->scales());
        }
      }

    // The given plane goes before the engine and its backend (NCCL's synchronizes the backend's
    // stream as it goes); the engine does not use its plane as it goes.
    given.reset();
    std::lock_guard lk(mu);
    out.slots_hold_their_experts = out.slots_hold_their_experts && exact;
    if (comm.rank() == 0) {
      out.outputs = res.outputs;
      out.events = trunk.rebalancer.events();
      out.balancedness = trunk.rebalancer.balancedness();
      out.final_placement = pl;
      out.graph_replays = engine->backend().counters().graph_replays;
      out.load = trunk.domain.recorder.dump_window();
      out.tokens = trunk.domain.recorder.dump_tokens();
    }
  });
  return out;
}

// Ranks whose passes can be one graph: on a GPU the engine's own plane and CUDA graphs (nothing to
// give); on the CPU the thread plane on each rank's backend, which records graphs as CUDA does
// (tests/support/recording_backend.h).
struct GraphRanks {
  DevicePlane plane;
  WrapBackend wrap;
};
GraphRanks graph_ranks() {
  if (test_backend(1)->can_capture()) return {};
  return {[](dist::Communicator&, kernels::Backend& be, dist::DataPlane& threads) {
            return threads.on_device(std::make_unique<runtime::BackendDeviceQueue>(be));
          },
          [](std::unique_ptr<kernels::Backend> be) -> std::unique_ptr<kernels::Backend> {
            return std::make_unique<RecordingBackend>(std::move(be));
          }};
}

std::vector<std::vector<int32_t>> single_rank(const std::string& fixture, const std::vector<std::vector<int32_t>>& prompts,
                                              int max_new = 12) {
  return load_engine(kFixtures / fixture, 1)->generate(prompts, max_new).outputs;
}

class ExpertParallel : public ::testing::TestWithParam<std::string> {};

TEST_P(ExpertParallel, OutputsEqualSingleRankForEveryRankCountAndPolicy) {
  const auto prompts = ep_prompts_of(GetParam());
  const auto want = single_rank(GetParam(), prompts);
  for (int G : {1, 2, 4})
    for (auto policy : {eplb::Dispatch::static_, eplb::Dispatch::random, eplb::Dispatch::balanced}) {
      const int R = redundant_for(model::load_model_config(kFixtures / GetParam()).num_experts, G, G);
      auto got = run_ep(GetParam(), prompts, G, R, policy, /*rebalance_every=*/3);
      EXPECT_EQ(got.outputs, want) << "G=" << G << " dispatch=" << eplb::dispatch_name(policy);
      EXPECT_TRUE(got.slots_hold_their_experts) << "G=" << G;
      if (G > 1) {
        ASSERT_FALSE(got.events.empty()) << "no rebalance happened";
        EXPECT_GT(got.events.front().experts_moved, 0) << "the first rebalance moved nothing";
        for (const auto& ev : got.events) EXPECT_FALSE(ev.failed);
      }
    }
}

#ifdef BALLAST_HAS_NCCL
// The engine's rows, counts and weights over the NCCL data plane on the GPU (in place of host
// staging), every dispatch policy, rebalancing: the single rank's outputs. One rank: the test
// backend puts every rank on GPU 0 and NCCL takes one rank a GPU (test_dist_nccl covers more).
TEST_P(ExpertParallel, OverNcclOutputsEqualSingleRank) {
  const char* device = std::getenv("BALLAST_TEST_DEVICE");
  if (!device || std::string(device) != "cuda") GTEST_SKIP() << "NCCL moves CUDA buffers (BALLAST_TEST_DEVICE=cuda)";
  const auto prompts = ep_prompts_of(GetParam());
  const auto want = single_rank(GetParam(), prompts);
  const DevicePlane nccl = [](dist::Communicator& comm, kernels::Backend& be, dist::DataPlane&) {
    return std::make_unique<dist::NcclDataPlane>(comm, 0, be.stream());
  };
  const int R = redundant_for(model::load_model_config(kFixtures / GetParam()).num_experts, 1, 1);
  for (auto policy : {eplb::Dispatch::static_, eplb::Dispatch::random, eplb::Dispatch::balanced}) {
    auto got = run_ep(GetParam(), prompts, 1, R, policy, /*rebalance_every=*/3, 12, {}, nccl);
    EXPECT_EQ(got.outputs, want) << "dispatch=" << eplb::dispatch_name(policy);
    EXPECT_TRUE(got.slots_hold_their_experts);
  }
}
#endif

// The planes an engine may move its buffers over, named: the in-process ranks' plane on the device
// they share (the engine's own choice on a GPU, made here on every backend: on the CPU's the same
// copies through the backend's queue), and host staging (the fallback for a GPU's buffers).
TEST_P(ExpertParallel, OverEveryPlaneForDeviceBuffersOutputsEqualSingleRank) {
  const auto prompts = ep_prompts_of(GetParam());
  const auto want = single_rank(GetParam(), prompts);
  const std::pair<const char*, DevicePlane> planes[] = {
      {"on the device", [](dist::Communicator&, kernels::Backend& be,
                           dist::DataPlane& threads) { return threads.on_device(std::make_unique<runtime::BackendDeviceQueue>(be)); }},
      {"host staging", [](dist::Communicator&, kernels::Backend& be, dist::DataPlane& threads) {
         return std::make_unique<runtime::StagedDataPlane>(threads, be);
       }}};
  for (const auto& [name, plane] : planes)
    for (int G : {2, 4})
      for (auto policy : {eplb::Dispatch::static_, eplb::Dispatch::balanced}) {
        const int R = redundant_for(model::load_model_config(kFixtures / GetParam()).num_experts, G, G);
        auto got = run_ep(GetParam(), prompts, G, R, policy, /*rebalance_every=*/3, 12, {}, plane);
        EXPECT_EQ(got.outputs, want) << name << ", G=" << G << " dispatch=" << eplb::dispatch_name(policy);
        EXPECT_TRUE(got.slots_hold_their_experts) << name << ", G=" << G;
        ASSERT_FALSE(got.events.empty()) << name << ": no rebalance happened";
        for (const auto& ev : got.events) EXPECT_FALSE(ev.failed) << name;
      }
}

// Graphs under in-process expert parallelism (runtime/graph_group.h): every
// rank's decode pass captured as one graph, replayed from rank 0, the rows' counts on the device
// inside it. On the CPU over a backend that records graphs as CUDA does
// (tests/support/recording_backend.h) and the thread plane on it; on a GPU (BALLAST_TEST_DEVICE=cuda)
// the engine's own plane and CUDA graphs. Eight prompts, so that the ranks'
// batches fall in the same bucket and agree on a graph; rebalancing every 3 passes (the graphs
// are captured again when buffers move). With five prompts the ranks' batches fall in different
// buckets: a graph of those.
TEST_P(ExpertParallel, GraphsOfEveryRanksPassOutputEqualSingleRank) {
  const auto five = ep_prompts_of(GetParam());
  const auto &a = five[0], &b = five[1];
  auto more = five;
  more.insert(more.end(), {{a.begin() + 1, a.begin() + 30}, {b.begin() + 2, b.end()}, {a.begin() + 5, a.end()}});
  const auto eight = more;
  for (const auto* prompts : {&eight, &five}) {
    const auto want = single_rank(GetParam(), *prompts);
    const GraphRanks ranks = graph_ranks();
    for (int G : {2, 4})
      for (auto policy : {eplb::Dispatch::static_, eplb::Dispatch::balanced}) {
        const int R = redundant_for(model::load_model_config(kFixtures / GetParam()).num_experts, G, G);
        auto got = run_ep(GetParam(), *prompts, G, R, policy, /*rebalance_every=*/3, 12, {}, ranks.plane, ranks.wrap);
        const std::string where =
            fmt::format("{} prompts, G={}, dispatch={}", prompts->size(), G, eplb::dispatch_name(policy));
        EXPECT_EQ(got.outputs, want) << where;
        EXPECT_TRUE(got.slots_hold_their_experts) << where;
        EXPECT_GT(got.graph_replays, 0) << where << ": no graph was replayed";
        ASSERT_FALSE(got.events.empty()) << "no rebalance happened";
        for (const auto& ev : got.events) EXPECT_FALSE(ev.failed);
      }
  }
}

// A graph pass pads each rank's batch to its bucket with rows of the cache's padding sequence:
// those rows go to no expert (ModelRunner marks them, topk_softmax gives them none), so the
// experts read nothing for them and the recorded load and token trace are the eager run's, which
// has no padding. Five prompts over G = 2: batches of 3 (padded to 4) and 2.
TEST_P(ExpertParallel, RowsThatOnlyPadAGraphGoToNoExpert) {
  const auto prompts = ep_prompts_of(GetParam());
  const GraphRanks ranks = graph_ranks();
  const int G = 2, R = redundant_for(model::load_model_config(kFixtures / GetParam()).num_experts, G, G);
  auto run = [&](bool graphs) {
    return run_ep(GetParam(), prompts, G, R, eplb::Dispatch::static_, /*rebalance_every=*/0, 12, {}, ranks.plane,
                  ranks.wrap, [&](runtime::EngineOptions& o) {
                    o.cuda_graphs = graphs;
                    o.ep.trunk.recorder_mode = eplb::RecorderMode::per_token;
                  });
  };
  const EpRun graphed = run(true), eager = run(false);
  EXPECT_GT(graphed.graph_replays, 0);
  EXPECT_EQ(eager.graph_replays, 0);
  EXPECT_EQ(graphed.outputs, eager.outputs);
  ASSERT_GT(eager.load.passes, 0);
  EXPECT_EQ(graphed.load.passes, eager.load.passes);
  EXPECT_EQ(graphed.load.count, eager.load.count) << "the recorded load counts padding rows";
  EXPECT_EQ(graphed.tokens, eager.tokens) << "the token trace holds padding rows";
}

TEST_P(ExpertParallel, FailedTransferKeepsOldPlacementAndCorrectOutputs) {
  const auto prompts = ep_prompts_of(GetParam());
  const auto want = single_rank(GetParam(), prompts);
  const auto cfg = model::load_model_config(kFixtures / GetParam());
  const int G = 2;
  const int R = redundant_for(cfg.num_experts, G, 1);
  // Every transfer fails (on every rank): no layer may switch, anywhere.
  auto got = run_ep(GetParam(), prompts, G, R, eplb::Dispatch::static_, 3, 12, [](int) { return true; });
  EXPECT_EQ(got.outputs, want);
  ASSERT_FALSE(got.events.empty());
  for (const auto& ev : got.events) EXPECT_TRUE(ev.failed);
  int moe_layers = 0;
  for (auto f : cfg.ffn_types) moe_layers += f == model::FfnType::Moe;
  EXPECT_EQ(got.final_placement,
            eplb::Placement::trivial(moe_layers, cfg.num_experts, cfg.num_experts + R, G));
  EXPECT_TRUE(got.slots_hold_their_experts);
}

TEST_P(ExpertParallel, PrefillLogitsEqualSingleRank) {
  auto ref = io::SafetensorsFile::open(kFixtures / GetParam() / "reference.safetensors");
  const auto prompt = ids(*ref, "prompt_ids");
  const auto want = load_engine(kFixtures / GetParam(), 1)->prefill_logits(prompt);
  const int G = 4;
  const int R = redundant_for(model::load_model_config(kFixtures / GetParam()).num_experts, G);
  std::vector<float> got;
  dist::ThreadWorld world(G);
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    runtime::EngineOptions opts{.comm = &comm, .data = &world.data_plane(comm.rank())};
    opts.ep.trunk.redundant = R + G;  // every rank holds replicas
    opts.ep.trunk.dispatch = eplb::Dispatch::balanced;
    auto engine = load_engine(kFixtures / GetParam(), 1, opts);
    // Rank 0's sequence; the others take part with none, serving their experts.
    auto logits = engine->prefill_logits(comm.rank() == 0 ? std::span<const int32_t>(prompt) : std::span<const int32_t>());
    if (comm.rank() == 0) got = std::move(logits);
  });
  EXPECT_LE(rel_max_err(got, want), 1e-5);
}

TEST_P(ExpertParallel, SlotFillingReportsEachDomainsBytes) {
  // Every rank's slots of each domain are reported as they fill: bytes done rising to the slots'
  // bytes, the trunk's first, then the MTP layer's where the model has one.
  const int G = 2;
  std::vector<std::vector<std::tuple<std::string, uint64_t, uint64_t>>> seen(G);
  std::vector<std::vector<std::pair<std::string, uint64_t>>> want(G);
  dist::ThreadWorld world(G);
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    runtime::EngineOptions opts{.comm = &comm, .data = &world.data_plane(comm.rank())};
    auto& mine = seen[size_t(comm.rank())];
    opts.slot_progress = [&mine](const std::string& d, uint64_t done, uint64_t total) { mine.emplace_back(d, done, total); };
    auto engine = load_engine(kFixtures / GetParam(), 1, opts);
    for (moe::ExpertParallelDomain* d : {engine->trunk_ep(), engine->mtp_ep()})
      if (d) want[size_t(comm.rank())].emplace_back(d->domain.name, d->slots.bytes());
  });
  for (int r = 0; r < G; ++r) {
    std::vector<std::pair<std::string, uint64_t>> ends;  // each domain's last report
    uint64_t last = 0;
    for (const auto& [d, done, total] : seen[size_t(r)]) {
      if (ends.empty() || ends.back().first != d) ends.emplace_back(d, 0), last = 0;
      EXPECT_GT(done, last) << d << " on rank " << r;
      EXPECT_LE(done, total) << d << " on rank " << r;
      last = done;
      ends.back().second = done;
    }
    EXPECT_EQ(ends, want[size_t(r)]) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ExpertParallel, ::testing::ValuesIn(fixtures_with("reference.safetensors")),
                         [](const auto& info) { return info.param; });

TEST(ExpertParallelBalance, RebalancingRaisesPerPassBalancedness) {
  // qwen3_next_a's routers are skewed; with 4 ranks and 4 redundant slots, planning from the
  // recorded load must raise the balance the dispatch achieves per pass.
  const auto base = ep_prompts_of("qwen3_next_a");
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 4; ++i) prompts.insert(prompts.end(), base.begin(), base.end());
  auto got = run_ep("qwen3_next_a", prompts, 4, 4, eplb::Dispatch::balanced, 6, 24);
  ASSERT_FALSE(got.events.empty());
  const size_t switch_pass = size_t(got.events.front().pass) + 1;
  ASSERT_LT(switch_pass + 2, got.balancedness.size());
  double before = 0, after = 0;
  for (size_t p = 1; p < switch_pass; ++p) before += got.balancedness[p] / double(switch_pass - 1);
  for (size_t p = switch_pass; p < got.balancedness.size(); ++p)
    after += got.balancedness[p] / double(got.balancedness.size() - switch_pass);
  EXPECT_GT(after, before) << "decode passes before the rebalance: " << before << ", after: " << after;
  // Planned for the domain's balanced dispatch: in every layer the replicas link all 4 ranks.
  const auto& pl = got.final_placement;
  for (int l = 0; l < pl.layers; ++l)
    EXPECT_EQ(eplb::replica_graph_components(pl.layer(l), pl.ranks, pl.logical), 1) << "layer " << l;
}

}  // namespace
