// The watchdog of the MPI planes (issue 16): a call that waits past the limit is reported once,
// naming the call; calls that finish in time never are.
#include "ballast/dist/watchdog.h"

#include <gtest/gtest.h>

#include <chrono>
#include <mutex>
#include <string>
#include <thread>

namespace ballast::dist {
namespace {

using namespace std::chrono_literals;

TEST(Watchdog, ReportsACallThatWaitsPastTheLimitOnce) {
  std::mutex mu;
  std::vector<std::string> reports;
  Watchdog w(100ms, [&](const std::string& why) {
    std::lock_guard lk(mu);
    reports.push_back(why);
  });
  for (int i = 0; i < 20; ++i) {
    Watchdog::Scope s(&w, "MPI_Allreduce (quick)");
    std::this_thread::sleep_for(5ms);
  }
  std::this_thread::sleep_for(200ms);  // idle between calls: nothing to report
  {
    std::lock_guard lk(mu);
    EXPECT_TRUE(reports.empty());
  }
  {
    Watchdog::Scope s(&w, "MPI_Allgather");
    std::this_thread::sleep_for(400ms);
  }
  std::lock_guard lk(mu);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_NE(reports[0].find("in MPI_Allgather for the other ranks, over the limit of 0.1 s"), std::string::npos)
      << reports[0];
}

TEST(Watchdog, OffWithoutALimit) {
  bool fired = false;
  Watchdog w(0ms, [&](const std::string&) { fired = true; });
  {
    Watchdog::Scope s(&w, "x");
    Watchdog::Scope t(nullptr, "no watchdog at all");
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_FALSE(fired);
}

}  // namespace
}  // namespace ballast::dist
