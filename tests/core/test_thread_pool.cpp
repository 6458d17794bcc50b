#include "ballast/core/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

using namespace ballast;

TEST(ThreadPool, CoversRangeExactlyOnce) {
  ThreadPool pool(4);
  for (int64_t n : {1, 7, 100, 10007}) {
    std::vector<std::atomic<int>> hits(n);
    pool.parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPool, ManyJobsInARow) {
  ThreadPool pool(3);
  std::atomic<int64_t> sum{0};
  for (int r = 0; r < 2000; ++r) pool.parallel_for(64, [&](int64_t b, int64_t e) { sum += e - b; });
  EXPECT_EQ(sum.load(), 2000 * 64);
}

// Idle workers spin a short while, then sleep: jobs right after one another (caught spinning)
// and after a pause longer than the spin (woken from sleep) both run every chunk once.
TEST(ThreadPool, JobsAfterSpinningAndAfterSleeping) {
  ThreadPool pool(3);
  for (int pause_us : {0, 2000, 0, 5000}) {
    std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
    std::vector<std::atomic<int>> hits(97);
    pool.parallel_for(97, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (int64_t i = 0; i < 97; ++i) ASSERT_EQ(hits[i].load(), 1) << "after " << pause_us << " us, i=" << i;
  }
}
