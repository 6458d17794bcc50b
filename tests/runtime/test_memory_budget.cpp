// --mem-fraction-static: the KV rows a fraction of the device's memory leaves (runtime/memory_budget.h),
// and the engine that sizes its cache by it.
#include <gtest/gtest.h>

#include <limits>
#include <string>

#include "ballast/core/error.h"
#include "ballast/runtime/engine.h"
#include "ballast/runtime/memory_budget.h"
#include "fixtures.h"

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

// The engine on the test device (the host's memory on the CPU; BALLAST_TEST_DEVICE=cuda: the
// GPU's): a fraction that leaves about 64 MB once the weights are in gives a cache of about that
// many bytes, a context within it, and the same after a rebuild for speculation (the old cache is
// given back before measuring); a budget the state slots alone exceed is an error naming the flag.
TEST(MemoryBudget, TheEngineSizesItsCacheFromTheDevicesMemory) {
  // The memory free with the weights in, measured beside an engine of next to no cache.
  CacheOptions tiny;
  tiny.max_total_tokens = 16;
  tiny.max_running_requests = 1;
  auto probe = test::load_engine(test::kDemoModel, 1, {.cache = tiny});
  const model::ModelConfig cfg = probe->config();  // a copy: the probe goes before the engine comes
  const int64_t block_bytes =
      StateCache::block_bytes(cfg, probe->backend().kv_cache_dtype(), 16, probe->model().has_mtp());
  const kernels::MemoryInfo m = probe->backend().memory();
  probe.reset();
  ASSERT_GT(m.free_bytes, 256 * MB) << "this host has too little memory free for the test";
  CacheOptions cache;
  cache.max_running_requests = 4;
  cache.mem_fraction_static = 1.0 - double(m.free_bytes - 64 * MB) / double(m.total_bytes);
  auto engine = test::load_engine(test::kDemoModel, 1, {.cache = cache});
  const int64_t rows = engine->max_total_tokens();
  // The free memory moves between the two measurements (other processes, what this one has not
  // given back yet): within 48 MB either way (the default cache, 64 K rows, would be 196 MB).
  const int64_t slots = (cache.max_running_requests + 2) * StateCache::slot_bytes(cfg);
  EXPECT_GE(rows / 16 * block_bytes, 16 * MB - slots) << rows << " rows";
  EXPECT_LE(rows / 16 * block_bytes, 112 * MB) << rows << " rows";
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
    test::load_engine(test::kDemoModel, 1, {.cache = cache});
    ADD_FAILURE() << "a budget the state slots exceed built a cache";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--mem-fraction-static"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("no room for a KV cache"), std::string::npos) << e.what();
  }
}

}  // namespace
