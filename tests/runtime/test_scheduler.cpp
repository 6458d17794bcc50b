// The state cache's four mutators and the scheduler's pass formation, on their own.
#include <gtest/gtest.h>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/cpu_backend.h"
#include "ballast/kernels/ops.h"
#include "ballast/model/config.h"
#include "ballast/runtime/scheduler.h"
#include "ballast/runtime/state_cache.h"
#include "fixtures.h"

using namespace ballast;
using namespace ballast::runtime;

namespace {

struct CacheFixture : ::testing::Test {
  kernels::CpuBackend backend{1};
  model::ModelConfig cfg = model::load_model_config(test::kFixtures / "qwen3_next_a");
};

using StateCacheTest = CacheFixture;

// What a memory budget buys (runtime/memory_budget.h) is counted by block_bytes and slot_bytes:
// they must be what the constructor allocates, with and without the MTP layer's KV, besides the
// block tables (a row of I32 per entry, as wide as the blocks an entry may hold: here every block).
TEST_F(StateCacheTest, BlockAndSlotBytesAreWhatTheCacheAllocates) {
  for (const bool mtp : {false, true}) {
    const int64_t before = backend.counters().bytes_allocated;
    StateCache cache(backend, cfg, {.block_size = 4, .blocks = 7, .slots = 6, .mtp = mtp});
    EXPECT_EQ(backend.counters().bytes_allocated - before,
              7 * StateCache::block_bytes(cfg, backend.kv_cache_dtype(), 4, mtp) + 6 * StateCache::slot_bytes(cfg) +
                  6 * 7 * 4)
        << "mtp " << mtp;
    EXPECT_EQ(cache.bytes(), backend.counters().bytes_allocated - before);
  }
  EXPECT_EQ(StateCache::block_bytes(cfg, DType::BF16, 16, false) * 2, StateCache::block_bytes(cfg, DType::F32, 16, false));
  EXPECT_GT(StateCache::slot_bytes(cfg), 0);
}

// The block tables on the device (a row per entry, StateCache::block_tables): allocate gives each
// entry a row of its own, append records one write per new block (row * width + index, the block),
// each write is taken once, release drops the writes its row had not had made; an entry wider than
// the tables is refused, and entries past `entries` wait for a row even where slots are free.
TEST_F(StateCacheTest, BlockTablesAreWrittenOnlyWhereBlocksAreNew) {
  StateCache cache(backend, cfg, {.block_size = 4, .blocks = 9, .slots = 6, .entries = 3, .table_width = 3});
  ASSERT_EQ(cache.block_tables().dim(0), 3);
  ASSERT_EQ(cache.table_width(), 3);
  const auto padding = cache.take_table_writes();  // the padding sequence's block
  ASSERT_EQ(padding.size(), 1u);
  EXPECT_EQ(padding[0].at, cache.padding().table_row * 3);
  EXPECT_EQ(padding[0].block, cache.padding().blocks[0]);
  CacheEntry a, b;
  ASSERT_TRUE(cache.allocate(a));
  ASSERT_TRUE(cache.allocate(b));
  EXPECT_NE(a.table_row, b.table_row);
  EXPECT_NE(a.table_row, cache.padding().table_row);
  ASSERT_TRUE(cache.append(a, {.rows = 5}));
  const auto first = cache.take_table_writes();
  ASSERT_EQ(first.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(first[i].at, a.table_row * 3 + int32_t(i));
    EXPECT_EQ(first[i].block, a.blocks[i]);
  }
  EXPECT_TRUE(cache.take_table_writes().empty());
  ASSERT_TRUE(cache.append(a, {.rows = 1}));  // 6 rows: still two blocks
  EXPECT_TRUE(cache.take_table_writes().empty());
  ASSERT_TRUE(cache.append(b, {.rows = 3}));
  cache.release(b);
  EXPECT_TRUE(cache.take_table_writes().empty()) << "a released entry's writes were kept";
  EXPECT_THROW(cache.append(a, {.rows = 7}), Error);  // 13 rows: four blocks in tables of three
  CacheEntry c, d;
  ASSERT_TRUE(cache.allocate(c));
  EXPECT_FALSE(cache.allocate(d)) << "a fourth entry got a table row";
  EXPECT_GT(cache.free_slots(), 0);
}

TEST_F(StateCacheTest, AppendRollbackReleaseKeepTheBooks) {
  // One block and one slot of each pool go to the padding sequence.
  StateCache cache(backend, cfg, {.block_size = 4, .blocks = 7, .slots = 6, .mtp = true});
  CacheEntry e;
  ASSERT_TRUE(cache.allocate(e));
  EXPECT_EQ(cache.free_slots(), 4);
  // The slot's states start at zero in every DeltaNet layer.
  for (const auto& l : cache.views().layers) {
    if (!l.ssm.defined()) continue;
    for (float v : test::download(backend, l.ssm[e.slot])) {
      ASSERT_EQ(v, 0.0f);
    }
  }

  ASSERT_TRUE(cache.append(e, {.rows = 5}));
  EXPECT_EQ(e.length, 5);
  EXPECT_EQ(e.blocks.size(), 2u);  // 5 rows of 4 per block
  // A verification of 3 rows takes 3 snapshot slots and blocks for the MTP head's headroom too.
  ASSERT_TRUE(cache.append(e, {.rows = 3, .verify = true, .headroom = 2}));
  EXPECT_EQ(e.snapshots.size(), 3u);
  EXPECT_EQ(e.blocks.size(), 3u);  // 8 + 2 rows
  EXPECT_EQ(cache.free_slots(), 1);
  const int32_t after_first = e.snapshots[0];
  cache.rollback(e, 2);  // keep 1 of 3 verified rows: the state after it becomes the entry's
  EXPECT_EQ(e.length, 6);
  EXPECT_EQ(e.slot, after_first);
  EXPECT_TRUE(e.snapshots.empty());
  EXPECT_EQ(cache.free_slots(), 4);
  // Without snapshots, trunk rows cannot be dropped (the DeltaNet state has moved on).
  EXPECT_THROW(cache.rollback(e, 1), Error);
  ASSERT_TRUE(cache.append(e, {.mtp_rows = 6}));
  cache.rollback(e, 0, 2);
  EXPECT_EQ(e.mtp_length, 4);

  // Out of blocks: nothing changes.
  CacheEntry f;
  ASSERT_TRUE(cache.allocate(f));
  const int64_t free = cache.free_blocks();
  EXPECT_FALSE(cache.append(f, {.rows = 4 * (free + 1)}));
  EXPECT_EQ(f.length, 0);
  EXPECT_EQ(cache.free_blocks(), free);

  cache.release(e);
  cache.release(f);
  EXPECT_EQ(cache.free_blocks(), 6);
  EXPECT_EQ(cache.free_slots(), 5);
}

struct SchedulerTest : CacheFixture {
  std::vector<std::unique_ptr<Sequence>> seqs;
  Sequence& make(int64_t prompt, int max_new = 4) {
    auto s = std::make_unique<Sequence>();
    s->id = int64_t(seqs.size());
    s->tokens.assign(size_t(prompt), 1);
    s->prompt_len = size_t(prompt);
    s->max_new_tokens = max_new;
    seqs.push_back(std::move(s));
    return *seqs.back();
  }
  // What a step does after the pass: the drawn token joins the sequence.
  static void advance(const std::vector<Scheduled>& pass) {
    for (const auto& s : pass)
      if (s.draws) s.seq->tokens.push_back(2);
  }
};

TEST_F(SchedulerTest, BudgetChunksPrefillsAndRunningSequencesGoFirst) {
  StateCache cache(backend, cfg, {.block_size = 4, .blocks = 65, .slots = 9});
  Scheduler sched(cache, {.max_running = 2, .token_budget = 10});
  Sequence& a = make(25);
  Sequence& b = make(3);
  Sequence& c = make(2);
  sched.add(a), sched.add(b), sched.add(c);

  auto p1 = *sched.schedule();  // a's first chunk takes the whole budget
  ASSERT_EQ(p1.size(), 1u);
  EXPECT_EQ(p1[0].rows, 10);
  EXPECT_FALSE(p1[0].draws);
  auto p2 = *sched.schedule();  // a again (running first), then nothing is left for b
  ASSERT_EQ(p2.size(), 1u);
  EXPECT_EQ(p2[0].seq, &a);
  auto p3 = *sched.schedule();  // a's last 5 rows draw; b is admitted with the other 5
  ASSERT_EQ(p3.size(), 2u);
  EXPECT_EQ(p3[0].rows, 5);
  EXPECT_TRUE(p3[0].draws);
  EXPECT_EQ(p3[1].seq, &b);
  EXPECT_EQ(p3[1].rows, 3);
  advance(p3);
  auto p4 = *sched.schedule();  // two running (the maximum): c waits
  ASSERT_EQ(p4.size(), 2u);
  EXPECT_EQ(p4[0].rows, 1);
  EXPECT_EQ(sched.waiting(), 1u);
  for (auto& s : seqs) s->status = SequenceStatus::finished;
  sched.retire(a), sched.retire(b), sched.retire(c);
  EXPECT_FALSE(sched.schedule().has_value());
  EXPECT_EQ(cache.free_blocks(), 64);
}

TEST_F(SchedulerTest, TheNewestRunningSequenceIsPreemptedWhenTheCacheIsFull) {
  StateCache cache(backend, cfg, {.block_size = 4, .blocks = 5, .slots = 9});
  Scheduler sched(cache, {.max_running = 4, .token_budget = 64});
  Sequence& a = make(8, 8);
  Sequence& b = make(8, 8);
  sched.add(a), sched.add(b);
  auto p = *sched.schedule();  // both prefills: all 4 blocks
  ASSERT_EQ(p.size(), 2u);
  advance(p);
  p = *sched.schedule();  // a needs a fifth block: b is preempted and waits (first in line)
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].seq, &a);
  EXPECT_EQ(sched.preemptions(), 1);
  EXPECT_EQ(b.status, SequenceStatus::waiting);
  EXPECT_EQ(b.cache.length, 0);
  EXPECT_EQ(b.pending(), 9);  // recomputed from its tokens, the drawn one included
}

}  // namespace
