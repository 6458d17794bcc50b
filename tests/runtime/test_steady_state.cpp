// The device-ready core's promise, held by the backend's counters: once warm, a pass allocates no
// device memory and brings one thing back to the host (what the pass drew, with the expert
// domain's load in the same copy), here under the heaviest mix: 4 expert-parallel ranks,
// balanced dispatch, live rebalancing with weight migration, NEXTN speculation, and passes that
// mix chunked prefill with the decoding (verification) of many sequences.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <mutex>
#include <random>

#include "ballast/dist/thread_world.h"
#include "ballast/runtime/engine.h"
#include "fixtures.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

struct RankFigures {
  int64_t allocations = 0, downloads = 0, passes = 0, rebalances = 0, mixed_passes = 0, max_running = 0;
  int64_t graph_passes = 0;  // replays (rank 0 replays a group's graph)
};

// graphs: on the CPU, over a backend that records graphs as CUDA does and the thread plane on it,
// so that decode, verification and draft passes are group graphs as on a GPU (where they are anyway).
void steady_state(int S, bool graphs) {
  const std::string fixture = "qwen3_next_a";
  const int G = 4;
  const int E = model::load_model_config(test::kFixtures / fixture).num_experts;
  std::vector<RankFigures> figures(G);
  std::mutex mu;
  dist::ThreadWorld world(G);
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    test::GraphRank rank = graphs ? test::graph_rank(world, comm.rank()) : test::GraphRank{test::test_backend(1)};
    const bool group_graphs = graphs || rank.backend->can_capture();  // a GPU's engine takes them itself
    EngineOptions opts{.comm = &comm, .data = &rank.data(world, comm.rank())};
    opts.log.level = LogLevel::Quiet;
    opts.speculative_steps = S;
    opts.cache.chunked_prefill_size = 48;  // prompts arrive while others decode: chunks mix with verifications
    opts.cache.max_running_requests = 12;
    opts.ep.mtp.emplace();
    for (auto* d : {&opts.ep.trunk, &*opts.ep.mtp}) {
      d->redundant = test::redundant_for(E, G, G);
      d->dispatch = eplb::Dispatch::balanced;
      d->rebalance.enabled = true;
      d->rebalance.interval = 6;
      d->rebalance.layers_per_chunk = 1;
    }
    auto engine = Engine::load(test::kFixtures / fixture, std::move(rank.backend), opts);
    std::mt19937 rng(uint32_t(100 + comm.rank()));
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 12; ++i) {
      std::vector<int32_t> p(size_t(5 + rng() % 40));
      for (auto& t : p) t = int32_t(rng() % uint32_t(engine->config().vocab_size));
      prompts.push_back(std::move(p));
    }
    RankFigures f;
    // Three requests arrive per step, each generating 10 tokens.
    auto workload = [&] {
      size_t next = 0;
      for (;;) {
        for (int a = 0; a < 3 && next < prompts.size(); ++a) engine->add_request({prompts[next++], {}, 10, {}});
        const int64_t prefill = engine->stats().prefill_tokens;
        const size_t running = engine->scheduler().running();
        if (!engine->step()) break;
        f.mixed_passes += engine->stats().prefill_tokens > prefill && running > 0;
        f.max_running = std::max<int64_t>(f.max_running, int64_t(engine->scheduler().running()));
      }
    };
    auto passes = [&] { return engine->trunk_ep()->domain.passes + engine->mtp_ep()->domain.passes; };
    workload();  // warm-up: every buffer reaches the size these passes need
    // Under group graphs a graph pass's rows are sized by what its sources hold, so the workspace's
    // peak depends on which passes meet which: the first workload does not reach it (on the CPU, one
    // growth of rank 0's workspace in the second at S = 1), the second does.
    if (group_graphs) workload();
    const kernels::Counters before = engine->backend().counters();
    // The plane's downloads (the counts of the eager passes' collectives) are its own.
    auto plane_downloads = [&] { return rank.queue ? rank.queue->downloads() : engine->plane_downloads(); };
    const int64_t plane_before = plane_downloads();
    const int64_t passes_before = passes();
    const size_t events_before = engine->trunk_ep()->rebalancer.events().size() +
                                 engine->mtp_ep()->rebalancer.events().size();
    f = RankFigures{};
    workload();
    const kernels::Counters& after = engine->backend().counters();
    f.allocations = after.allocations - before.allocations;
    // Host staging of the data plane (in-process ranks sharing a GPU) is the emulation's cost,
    // not the pass's: it is counted apart.
    f.downloads = after.downloads - before.downloads - (plane_downloads() - plane_before);
    f.passes = passes() - passes_before;
    f.rebalances = int64_t(engine->trunk_ep()->rebalancer.events().size() +
                           engine->mtp_ep()->rebalancer.events().size() - events_before);
    if (graphs) f.graph_passes = engine->backend().counters().graph_replays;
    rank.plane.reset();  // its queue is the engine's backend's
    std::lock_guard lk(mu);
    figures[size_t(comm.rank())] = f;
  });
  for (int r = 0; r < G; ++r) {
    const RankFigures& f = figures[size_t(r)];
    ::testing::Test::RecordProperty("rank" + std::to_string(r), fmt::format("{} passes, {} downloads, {} allocations, {} rebalances, "
                                                           "{} mixed passes, up to {} running",
                                                           f.passes, f.downloads, f.allocations, f.rebalances,
                                                           f.mixed_passes, f.max_running));
    EXPECT_EQ(f.allocations, 0) << "rank " << r << " allocated device memory after the warm-up";
    EXPECT_LE(f.downloads, f.passes) << "rank " << r << ": more than one device-to-host copy per pass";
    // The run exercised what it claims to: passes, rebalances, mixed passes of many sequences.
    EXPECT_GT(f.passes, 20) << "rank " << r;
    EXPECT_GT(f.rebalances, 0) << "rank " << r;
    EXPECT_GT(f.mixed_passes, 0) << "rank " << r;
    EXPECT_GE(f.max_running, 8) << "rank " << r;
    if (graphs && r == 0) {
      EXPECT_GT(f.graph_passes, 0) << "no group graph was replayed";
    }
  }
}

TEST(SteadyState, NoAllocationAndOneDownloadPerPassUnderExpertParallelismAndSpeculation) { steady_state(2, false); }

// The same with group graphs, and with one draft step (issued before the verification's download).
TEST(SteadyState, NoAllocationAndOneDownloadPerPassUnderGroupGraphs) {
  for (int S : {1, 2}) {
    SCOPED_TRACE(fmt::format("{} draft steps", S));
    steady_state(S, true);
  }
}

}  // namespace
