#include "ballast/core/error.h"
#include "ballast/eplb/migration.h"

#include <gtest/gtest.h>

using namespace ballast::eplb;

TEST(Migration, LocalThenNodeThenAcross) {
  // 4 ranks x 2 slots, 2 nodes of 2 ranks.
  Placement a(1, 6, 8, 4), b(1, 6, 8, 4);
  int old_row[8] = {0, 1, 2, 3, 4, 5, 0, 1};
  int new_row[8] = {1, 0, 2, 4, 3, 5, 0, 2};
  std::copy(old_row, old_row + 8, a.layer(0).begin());
  std::copy(new_row, new_row + 8, b.layer(0).begin());
  auto m = plan_migration(a, b, 2, 100);
  // slot 0 <- 1: rank 0 holds 1 (slot 1): local; slot 1 <- 0 local; slot 3 <- 4 from rank 2 (other
  // node); slot 4 <- 3 from rank 1 (other node); slot 7 <- 2 from rank 1 (other node)
  EXPECT_EQ(m.local, 2);
  EXPECT_EQ(m.inter_node, 3);
  EXPECT_EQ(m.experts_moved, 3);
  EXPECT_EQ(m.bytes_moved, 300);
  ASSERT_EQ(m.copies.size(), 5u);
  EXPECT_EQ(m.copies[0].kind, CopyKind::local);
  EXPECT_EQ(m.copies[4].kind, CopyKind::inter_node);
  EXPECT_EQ(m.received[3], 1);
  EXPECT_EQ(m.sent[1], 2);
  auto same = plan_migration(a, a, 2);
  EXPECT_TRUE(same.copies.empty());
}

TEST(Migration, SpreadsSenders) {
  // expert 0 on ranks 0 and 1; ranks 2 and 3 both want it: one from each sender.
  Placement a(1, 3, 4, 4), b(1, 3, 4, 4);
  int old_row[4] = {0, 0, 1, 2};
  int new_row[4] = {1, 2, 0, 0};
  std::copy(old_row, old_row + 4, a.layer(0).begin());
  std::copy(new_row, new_row + 4, b.layer(0).begin());
  auto m = plan_migration(a, b, 0);
  EXPECT_EQ(m.sent[0], 1);
  EXPECT_EQ(m.sent[1], 1);
  EXPECT_EQ(m.experts_moved, 4);
  b.layer(0)[0] = 0, a.layer(0)[0] = 1, a.layer(0)[1] = 1;  // old has no expert 0
  EXPECT_THROW(plan_migration(a, b, 0), ballast::Error);
}

// vLLM's preserve-intra-GPU-slots semantics: the same experts per rank as the new placement, an
// expert the rank held before in its old slot, the rest in order.
TEST(Migration, KeepSlots) {
  Placement old(1, 8, 8, 2), next(1, 8, 8, 2);
  int o[8] = {0, 1, 2, 3, 4, 5, 6, 7}, n[8] = {1, 5, 0, 4, 6, 2, 7, 3};
  std::copy(o, o + 8, old.layer(0).begin());
  std::copy(n, n + 8, next.layer(0).begin());
  auto kept = keep_slots(next, old);
  std::vector<int32_t> want{0, 1, 5, 4, 2, 3, 6, 7};  // 0 and 1 stay on rank 0, 6, 7 on rank 1
  EXPECT_EQ(std::vector<int32_t>(kept.layer(0).begin(), kept.layer(0).end()), want);
  EXPECT_EQ(slots_kept(old, kept), std::vector<int>{4});
  EXPECT_EQ(slots_kept(old, next), std::vector<int>{0});
  // Duplicates on a rank and empty old slots (-1).
  std::vector<int32_t> o2{0, 1, 0, 2, -1, 4, 5, 6, 1, 2}, n2{0, 5, 4, 0, 1, 6, 2, 3, 2, 1};
  auto r = keep_slots(n2, o2, 1, 10, 2);
  EXPECT_EQ(r, (std::vector<int32_t>{0, 1, 0, 5, 4, 3, 2, 6, 1, 2}));
  EXPECT_THROW(keep_slots(n2, o2, 1, 10, 3), ballast::Error);
}
