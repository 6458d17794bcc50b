// --mem-fraction-static: the KV rows a fraction of the device's memory leaves (runtime/memory_budget.h),
// and the engine that sizes its cache by it.
#include <gtest/gtest.h>

#include <limits>
#include <string>

#include "ballast/core/error.h"
#include "ballast/runtime/engine.h"
#include "ballast/runtime/memory_budget.h"
#include "fixtures.h"
#include "support/reported_memory_backend.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

constexpr int64_t GB = int64_t(1) << 30, MB = int64_t(1) << 20;

TEST(MemoryBudget, TheFractionLeavesTheRestFreeAndTheSlotsComeFirst) {
  // 80 GB device, 60 GB free with the weights in, fraction 0.9: 8 GB stay free, 52 GB for the
  // cache; 4 GB of slots first, then 48 GB in blocks of 1 MB, less the padding sequence's block.
  const kernels::MemoryInfo m{60 * GB, 80 * GB};
  CacheBudget b{.fraction = 0.9, .sharing = 1, .slot_bytes = 4 * GB, .block_bytes = MB, .block_size = 16};
  EXPECT_EQ(cache_rows_for(m, b), (48 * 1024 - 1) * 16);
  // Two ranks on the device split what the fraction leaves, each then paying its own slots.
  b.sharing = 2;
  EXPECT_EQ(cache_rows_for(m, b), (22 * 1024 - 1) * 16);
  // Whole blocks only.
  b.sharing = 1;
  b.block_bytes = 3 * MB;
  EXPECT_EQ(cache_rows_for(m, b), (48 * 1024 / 3 - 1) * 16);
  // A small model on a large device: no more rows than 32-bit slot ids address.
  const kernels::MemoryInfo huge{int64_t(1) << 50, int64_t(1) << 50};
  EXPECT_EQ(cache_rows_for(huge, {.fraction = 0.9, .sharing = 1, .slot_bytes = 0, .block_bytes = 64, .block_size = 16}),
            (int64_t(std::numeric_limits<int32_t>::max()) / 16 - 1) * 16);
  // Nothing left: 0, not a negative count.
  b.fraction = 0.2;
  EXPECT_EQ(cache_rows_for(m, b), 0);
  b.fraction = 0.9;
  b.slot_bytes = 60 * GB;
  EXPECT_EQ(cache_rows_for(m, b), 0);
  // Nonsense budgets are refused, naming the figures.
  b.slot_bytes = 0;
  for (double f : {0.0, -0.5, 1.5}) {
    b.fraction = f;
    EXPECT_THROW(cache_rows_for(m, b), Error) << f;
  }
}

// The engine on the test backend, reporting a device of 4 GiB free but for what the engine
// allocates (tests/support: the host's own free memory moves with whatever else runs, so it is no
// test input): a fraction that leaves 64 MB once the weights are in gives a cache of that many
// bytes less the state slots, in whole blocks; the same after a rebuild for speculation (the old
// cache given back before measuring); a budget the state slots alone exceed is an error naming the
// flag.
TEST(MemoryBudget, TheEngineSizesItsCacheFromTheDevicesMemory) {
  constexpr int64_t kDevice = 4 * GB;  // the CUDA backend takes its weights in blocks of 1 GiB
  auto reporting = [&] { return std::make_unique<test::ReportedMemoryBackend>(test::test_backend(1), kDevice, kDevice); };
  // What the weights (and the rest the engine allocates before it measures) take, from an engine
  // with next to no cache.
  CacheOptions tiny;
  tiny.max_total_tokens = 16;
  tiny.max_running_requests = 1;
  auto probe = test::load_engine(test::kDemoModel, 1, {.cache = tiny});
  const model::ModelConfig cfg = probe->config();  // a copy: the probe goes before the engine comes
  const int64_t block_bytes =
      StateCache::block_bytes(cfg, probe->backend().kv_cache_dtype(), 16, probe->model().has_mtp());
  probe.reset();

  CacheOptions cache;
  cache.max_running_requests = 4;
  auto first = reporting();
  test::ReportedMemoryBackend* device = first.get();
  // Measure once what is allocated before the cache: a fraction of everything would leave all.
  cache.mem_fraction_static = 1.0;
  int64_t before_cache = 0;  // weights and the like
  {
    auto engine = Engine::load(test::kDemoModel, std::move(first), {.cache = cache});
    before_cache = kDevice - device->last_reported().free_bytes;  // (the engine owns the backend)
  }
  ASSERT_GT(before_cache, 0);
  cache.mem_fraction_static = double(before_cache + 64 * MB) / double(kDevice);
  auto second = reporting();
  device = second.get();
  auto engine = Engine::load(test::kDemoModel, std::move(second), {.cache = cache});
  EXPECT_EQ(device->last_reported().free_bytes, kDevice - before_cache) << "measured with other than the weights in";
  const int64_t rows = engine->max_total_tokens();
  const int64_t slots = (cache.max_running_requests + 2) * StateCache::slot_bytes(cfg);
  // 64 MB less the slots, in whole blocks, less the padding sequence's block (rounding of the
  // fraction: a byte either way).
  EXPECT_EQ(rows / 16, (64 * MB - slots + 1) / block_bytes - 1) << rows << " rows";
  EXPECT_EQ(rows % 16, 0);
  EXPECT_EQ(engine->context_length(), std::min<int64_t>(rows, cfg.max_position_embeddings));
  EXPECT_EQ(engine->cache().total_blocks() * 16, rows);
  const auto out = engine->generate({{1, 2, 3}}, 4);
  EXPECT_EQ(out.outputs.at(0).size(), 4u);
  if (engine->model().has_mtp()) {
    engine->set_speculative_steps(2);  // more slots, and the context less the drafts' headroom
    EXPECT_LE(engine->context_length(), engine->max_total_tokens() - 4);
    EXPECT_GE(engine->max_total_tokens(), rows / 2);
  }

  engine.reset();
  cache.max_running_requests = int(256 * MB / StateCache::slot_bytes(cfg));  // slots past the 64 MB
  try {
    Engine::load(test::kDemoModel, reporting(), {.cache = cache});
    ADD_FAILURE() << "a budget the state slots exceed built a cache";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--mem-fraction-static"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("no room for a KV cache"), std::string::npos) << e.what();
  }
}

// What the backend says of its device's memory is a device's: some of it free, no more than all.
TEST(MemoryBudget, TheTestBackendReportsItsDevicesMemory) {
  const kernels::MemoryInfo m = test::test_backend(1)->memory();
  EXPECT_GT(m.free_bytes, 0);
  EXPECT_LE(m.free_bytes, m.total_bytes);
}

}  // namespace
