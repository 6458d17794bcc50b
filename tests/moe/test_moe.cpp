// moe/ on its own: the device dispatch tables, the slot store, the expert-parallel runner against
// the local one, and the rebalancer's chunked migration, on CPU backends and thread ranks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>

#include "ballast/core/error.h"
#include "ballast/dist/thread_world.h"
#include "ballast/kernels/cpu/cpu_backend.h"
#include "ballast/moe/expert_parallel.h"
#include "ballast/moe/moe_runner.h"

using namespace ballast;

namespace {

template <typename T>
std::vector<T> download(kernels::Backend& be, const Tensor& t) {
  std::vector<T> v(size_t(t.numel()));
  be.download(t, v.data());
  return v;
}

Tensor upload(kernels::Backend& be, const void* host, std::vector<int64_t> shape, DType dtype) {
  Tensor t = be.alloc(std::move(shape), dtype);
  be.upload(host, t);
  return t;
}

// A random [r, c] weight in Qwen's fine-grained FP8: e4m3 codes (any, NaN excluded) and a
// random positive scale per 128 x 128 block.
Tensor random_fp8(int64_t r, int64_t c, std::mt19937& rng) {
  Tensor q = Tensor::zeros({r, c}, DType::F8_E4M3), s = Tensor::zeros({scale_blocks(r), scale_blocks(c)});
  for (int64_t i = 0; i < q.numel(); ++i) q.data<uint8_t>()[i] = uint8_t(rng() % 256) & 0xf7;  // 0x7f/0xff: NaN
  for (int64_t i = 0; i < s.numel(); ++i) s.f32()[i] = 1e-3f * float(1 + rng() % 100);
  return Tensor::block_scaled(q, s);
}

// E random experts of I x H (host, F32, or block-scaled FP8), the logical experts of `layers` layers.
struct Experts {
  std::vector<std::vector<float>> storage;
  std::vector<std::vector<kernels::SwigluWeights>> layers;
  Experts(int L, int E, int64_t I, int64_t H, uint32_t seed, DType dtype = DType::F32) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n(0.f, 0.3f);
    layers.resize(size_t(L));
    for (int l = 0; l < L; ++l)
      for (int e = 0; e < E; ++e) {
        auto make = [&](int64_t r, int64_t c) {
          if (dtype == DType::F8_E4M3_B128) return random_fp8(r, c, rng);
          auto& v = storage.emplace_back(size_t(r * c));
          for (auto& x : v) x = n(rng);
          return Tensor::borrow(v.data(), {r, c}, DType::F32);
        };
        storage.reserve(storage.size() + 3);
        kernels::SwigluWeights w;
        w.gate = make(I, H);
        w.up = make(I, H);
        w.down = make(H, I);
        layers[size_t(l)].push_back(w);
      }
  }
  std::vector<std::span<const kernels::SwigluWeights>> spans() const {
    return {layers.begin(), layers.end()};
  }
};

eplb::Placement shuffled(int L, int E, int P, int G, uint32_t seed) {
  eplb::Placement p = eplb::Placement::trivial(L, E, P, G);
  std::mt19937 rng(seed);
  for (int l = 0; l < L; ++l) std::shuffle(p.layer(l).begin(), p.layer(l).end(), rng);
  p.validate();
  return p;
}

TEST(DispatchTables, DeriveFromThePlacementAndSwitchInPlace) {
  kernels::CpuBackend be(1);
  const int L = 2, E = 6, P = 8, G = 2;
  const eplb::Placement pl = shuffled(L, E, P, G, 1);
  moe::DispatchTables tables(be, pl, eplb::Dispatch::static_, 1, 0);
  for (int l = 0; l < L; ++l) {
    const kernels::DispatchTables t = tables.layer(l);
    EXPECT_EQ(t.rank, 1);
    EXPECT_EQ(t.slots_per_rank, P / G);
    const auto row = pl.layer(l);
    EXPECT_EQ(download<int32_t>(be, t.phy2log), std::vector<int32_t>(row.begin(), row.end()));
    const auto table = eplb::static_table(row, G, 0, E);
    EXPECT_EQ(download<int32_t>(be, t.static_slot), std::vector<int32_t>(table.begin() + E, table.end()));
    const auto rep = eplb::replicas_of(row, E);
    const auto replicas = download<int32_t>(be, t.replicas);
    const auto counts = download<int32_t>(be, t.replica_count);
    const int64_t width = t.replicas.dim(1);
    for (int e = 0; e < E; ++e) {
      ASSERT_EQ(counts[size_t(e)], int32_t(rep[size_t(e)].size()));
      for (size_t j = 0; j < rep[size_t(e)].size(); ++j) EXPECT_EQ(replicas[size_t(e * width) + j], rep[size_t(e)][j]);
      EXPECT_EQ(replicas[size_t(e * width) + rep[size_t(e)].size()], -1);
    }
  }
  // A switch rewrites the layer's rows where they are.
  const void* before = tables.layer(1).phy2log.raw();
  const eplb::Placement next = shuffled(L, E, P, G, 2);
  tables.update_layer(1, next);
  EXPECT_EQ(tables.layer(1).phy2log.raw(), before);
  EXPECT_EQ(download<int32_t>(be, tables.layer(1).phy2log),
            std::vector<int32_t>(next.layer(1).begin(), next.layer(1).end()));
}

TEST(SlotStore, BlobsAreContiguousExpertsAtFixedAddresses) {
  kernels::CpuBackend be(1);
  const Experts ex(1, 3, 4, 8, 3);
  moe::SlotStore slots(be, 1, 2, 4, 8, DType::F32);
  slots.fill(0, 1, ex.layers[0][2]);
  const Tensor blob = slots.blob(0, 1);
  const auto& w = slots.weights(0, 1);
  EXPECT_EQ(blob.dtype(), DType::U8);
  EXPECT_EQ(blob.numel(), 3 * 4 * 8 * 4);
  EXPECT_EQ(w.gate.raw(), blob.raw());
  EXPECT_EQ(static_cast<const char*>(w.down.raw()), static_cast<const char*>(blob.raw()) + 2 * 4 * 8 * 4);
  EXPECT_EQ(std::memcmp(w.up.raw(), ex.layers[0][2].up.raw(), w.up.nbytes()), 0);
  EXPECT_EQ(slots.layer(0).size(), 2u);
  kernels::SwigluWeights wrong = ex.layers[0][0];
  wrong.down = wrong.down.reshape({4, 8});
  EXPECT_THROW(slots.fill(0, 0, wrong), Error);
}

// A block-scaled FP8 slot holds the elements and the scales of its expert in one blob, so that
// migration moves them together; slot views keep the scales at fixed addresses too.
TEST(SlotStore, Fp8SlotsHoldElementsAndScalesInOneBlob) {
  kernels::CpuBackend be(1);
  const int64_t I = 130, H = 136;  // 2 x 2 scale blocks, partial at the edges
  const Experts ex(1, 3, I, H, 5, DType::F8_E4M3_B128);
  moe::SlotStore slots(be, 1, 2, I, H, DType::F8_E4M3_B128);
  slots.fill(0, 1, ex.layers[0][2]);
  const Tensor blob = slots.blob(0, 1);
  const auto& w = slots.weights(0, 1);
  ASSERT_EQ(w.gate.dtype(), DType::F8_E4M3_B128);
  EXPECT_EQ(w.gate.scales().shape(), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(slots.bytes_per_expert(), size_t(blob.numel()));
  EXPECT_GE(slots.bytes_per_expert(), ex.layers[0][2].nbytes());  // elements and scales
  const char* b = static_cast<const char*>(blob.raw());
  for (const Tensor* t : {&w.gate, &w.up, &w.down, &w.gate.scales(), &w.up.scales(), &w.down.scales()}) {
    EXPECT_GE(static_cast<const char*>(t->raw()), b);
    EXPECT_LE(static_cast<const char*>(t->raw()) + t->nbytes(), b + blob.numel());
  }
  const auto& src = ex.layers[0][2];
  for (auto [a, c] : {std::pair{&src.gate, &w.gate}, {&src.up, &w.up}, {&src.down, &w.down}}) {
    EXPECT_EQ(std::memcmp(a->raw(), c->raw(), a->nbytes()), 0);
    EXPECT_EQ(std::memcmp(a->scales().raw(), c->scales().raw(), a->scales().nbytes()), 0);
  }
  // An F32 expert does not fit an FP8 slot.
  const Experts f32(1, 1, I, H, 6);
  EXPECT_THROW(slots.fill(0, 0, f32.layers[0][0]), Error);
}

// Routed choices of T tokens over E experts, identical on every rank that asks with the same seed.
struct Routed {
  std::vector<float> x, weights;
  std::vector<int32_t> ids;
  Routed(int64_t T, int k, int E, int64_t H, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n(0.f, 1.f);
    for (int64_t i = 0; i < T * H; ++i) x.push_back(n(rng));
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> all(static_cast<size_t>(E));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      for (int j = 0; j < k; ++j) ids.push_back(all[size_t(j)]), weights.push_back(0.1f + 0.2f * float(j));
    }
  }
};

// y = the local runner's output for the routed tokens.
std::vector<float> local(const Experts& ex, const Routed& r, int64_t T, int k, int64_t H) {
  kernels::CpuBackend be(1);
  kernels::Workspace ws(be);
  moe::LocalMoeRunner runner(be.ops());
  Tensor x = upload(be, r.x.data(), {T, H}, DType::F32), ids = upload(be, r.ids.data(), {T, k}, DType::I32);
  Tensor w = upload(be, r.weights.data(), {T, k}, DType::F32), out = be.alloc({T, H}, DType::F32);
  be.ops().zero(out);
  runner.run(0, x, ids, w, ex.layers[0], ws, out);
  return download<float>(be, out);
}

TEST(ExpertParallelRunner, EqualsTheLocalRunnerForEveryPolicy) {
  const int G = 2, L = 1, E = 8, P = 12, k = 3;
  const int64_t H = 16, I = 8;
  const Experts ex(L, E, I, H, 5);
  for (auto policy : {eplb::Dispatch::static_, eplb::Dispatch::random, eplb::Dispatch::balanced}) {
    std::mutex mu;
    dist::ThreadWorld world(G);
    dist::run_ranks(world, [&](dist::Communicator& comm) {
      const int r = comm.rank();
      const int64_t T = 5 + 3 * r;  // ranks run different numbers of tokens
      const Routed routed(T, k, E, H, 10 + uint32_t(r));
      kernels::CpuBackend be(1);
      kernels::Workspace ws(be);
      moe::DomainOptions o;
      o.dispatch = policy;
      Tensor load = be.alloc({L, P}, DType::I32);
      be.ops().zero(load);
      moe::ExpertParallelDomain d("trunk", ex.spans(), shuffled(L, E, P, G, 7), o, load,
                                  {be, comm, world.data_plane(r), 32});
      Tensor x = upload(be, routed.x.data(), {T, H}, DType::F32), ids = upload(be, routed.ids.data(), {T, k}, DType::I32);
      Tensor w = upload(be, routed.weights.data(), {T, k}, DType::F32), out = be.alloc({T, H}, DType::F32);
      be.ops().zero(out);
      d.runner.run(0, x, ids, w, {}, ws, out);
      const auto got = download<float>(be, out);
      const auto want = local(ex, routed, T, k, H);
      const auto counts = download<int32_t>(be, load);
      std::lock_guard lk(mu);
      double err = 0;
      for (size_t i = 0; i < got.size(); ++i) err = std::max(err, double(std::fabs(got[i] - want[i])));
      EXPECT_LE(err, 1e-5) << "rank " << r << " dispatch " << eplb::dispatch_name(policy);
      int64_t dispatched = 0;
      for (int32_t c : counts) dispatched += c;
      EXPECT_EQ(dispatched, T * k) << "rank " << r << ": the load counts every routed choice once";
    });
  }
}

TEST(ExpertParallelRunner, PerTokenRecordingKeepsEveryChoicesSlot) {
  const int G = 2, L = 1, E = 6, P = 8, k = 2;
  const int64_t H = 8, I = 4, T = 7;
  const Experts ex(L, E, I, H, 21);
  std::mutex mu;
  dist::ThreadWorld world(G);
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    const Routed routed(T, k, E, H, 30 + uint32_t(r));
    kernels::CpuBackend be(1);
    kernels::Workspace ws(be);
    moe::DomainOptions o;
    o.dispatch = eplb::Dispatch::random;
    o.recorder_mode = eplb::RecorderMode::per_token;
    Tensor load = be.alloc({L, P}, DType::I32);
    be.ops().zero(load);
    const eplb::Placement pl = shuffled(L, E, P, G, 9);
    moe::ExpertParallelDomain d("trunk", ex.spans(), pl, o, load, {be, comm, world.data_plane(r), 16, k});
    d.domain.recorder.start();
    Tensor x = upload(be, routed.x.data(), {T, H}, DType::F32), ids = upload(be, routed.ids.data(), {T, k}, DType::I32);
    Tensor w = upload(be, routed.weights.data(), {T, k}, DType::F32), out = be.alloc({T, H}, DType::F32);
    be.ops().zero(out);
    d.runner.run(0, x, ids, w, {}, ws, out);
    d.end_pass(download<int32_t>(be, load), T);
    const auto tokens = d.domain.recorder.dump_tokens();
    std::lock_guard lk(mu);
    ASSERT_EQ(tokens.size(), 1u);
    ASSERT_EQ(tokens[0][0].size(), size_t(T * k)) << "rank " << r;
    for (int64_t i = 0; i < T * k; ++i)  // every choice's slot holds the expert it was routed to
      EXPECT_EQ(pl.layer(0)[size_t(tokens[0][0][size_t(i)])], routed.ids[size_t(i)]) << "rank " << r << " choice " << i;
  });
}

class Rebalancer : public ::testing::TestWithParam<DType> {};

// F32 experts, and block-scaled FP8 ones (of several scale blocks) whose scales must move with them.
TEST_P(Rebalancer, MigratesOneChunkOfLayersPerPassIntoTheRightSlots) {
  const int G = 2, L = 3, E = 4, P = 6;
  const bool fp8 = GetParam() == DType::F8_E4M3_B128;
  const int64_t H = fp8 ? 136 : 8, I = fp8 ? 130 : 4;
  const Experts ex(L, E, I, H, 11, GetParam());
  std::mutex mu;
  dist::ThreadWorld world(G);
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    kernels::CpuBackend be(1);
    moe::DomainOptions o;
    o.rebalance.enabled = true;
    o.rebalance.interval = 2;
    o.rebalance.layers_per_chunk = 1;
    Tensor load = be.alloc({L, P}, DType::I32);
    moe::ExpertParallelDomain d("trunk", ex.spans(), eplb::Placement::trivial(L, E, P, G), o, load,
                                {be, comm, world.data_plane(r), 8});
    // Expert 2 (one replica, slot 2 on rank 0) carries most of every layer's load: every layer is
    // re-planned.
    std::vector<int32_t> pass(size_t(L * P), 1);
    for (int l = 0; l < L; ++l) pass[size_t(l * P + 2)] = 100;
    std::vector<int> changed_after;  // layers whose placement differs from trivial, after each pass
    const eplb::Placement trivial = eplb::Placement::trivial(L, E, P, G);
    for (int p = 0; p < 6; ++p) {
      d.end_pass(pass, 0);
      int changed = 0;
      for (int l = 0; l < L; ++l)
        changed += !std::equal(trivial.layer(l).begin(), trivial.layer(l).end(), d.domain.placement.layer(l).begin());
      changed_after.push_back(changed);
    }
    // Every slot holds its expert's weights, and the tables are the placement's.
    const int K = P / G;
    bool exact = true;
    for (int l = 0; l < L; ++l) {
      const auto row = d.domain.placement.layer(l);
      exact = exact && download<int32_t>(be, d.tables.layer(l).phy2log) == std::vector<int32_t>(row.begin(), row.end());
      for (int s = 0; s < K; ++s) {
        const auto& want = ex.layers[size_t(l)][size_t(row[r * K + s])];
        const auto& have = d.slots.weights(l, s);
        for (auto [a, b] : {std::pair{&want.gate, &have.gate}, {&want.up, &have.up}, {&want.down, &have.down}}) {
          exact = exact && std::memcmp(a->raw(), b->raw(), a->nbytes()) == 0;
          if (fp8) exact = exact && std::memcmp(a->scales().raw(), b->scales().raw(), a->scales().nbytes()) == 0;
        }
      }
    }
    std::lock_guard lk(mu);
    ASSERT_FALSE(d.rebalancer.events().empty());
    const auto& ev = d.rebalancer.events().front();
    EXPECT_EQ(ev.pass, 2);
    EXPECT_EQ(ev.layers_changed, 3);
    EXPECT_TRUE(ev.done);
    EXPECT_FALSE(ev.failed);
    // Planned after pass 2: one layer switches then, one after each of the next two passes.
    EXPECT_EQ(changed_after, (std::vector<int>{0, 1, 2, 3, 3, 3})) << "rank " << r;
    EXPECT_TRUE(exact) << "rank " << r;
  });
}

INSTANTIATE_TEST_SUITE_P(Dtypes, Rebalancer, ::testing::Values(DType::F32, DType::F8_E4M3_B128),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
