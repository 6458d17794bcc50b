// Which GPU a rank takes: its local rank, with an error naming the counts when its host has fewer
// GPUs than ranks.
#include "ballast/dist/local_gpu.h"

#include <gtest/gtest.h>

#include "support/expect_error.h"

namespace ballast::dist {
namespace {

TEST(LocalGpu, RanksOfAHostTakeItsGpusInOrder) {
  EXPECT_EQ(local_gpu(0, 1, 1), 0);
  EXPECT_EQ(local_gpu(3, 4, 4), 3);
  EXPECT_EQ(local_gpu(1, 2, 8), 1);  // more GPUs than ranks: the first ones
}

TEST(LocalGpu, FewerGpusThanRanksIsAnError) {
  test::expect_error([] { local_gpu(0, 4, 2); }, {"4 ranks run on this host", "2 GPUs", "at most 2 ranks"});
  test::expect_error([] { local_gpu(1, 2, 1); }, {"2 ranks", "1 GPU:", "at most 1 rank a host"});
  test::expect_error([] { local_gpu(2, 2, 4); }, {"local rank 2 of 2"});
}

}  // namespace
}  // namespace ballast::dist
