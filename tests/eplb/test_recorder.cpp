#include "ballast/core/error.h"
#include "ballast/eplb/recorder.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

using namespace ballast::eplb;

TEST(Recorder, StatWindowConvertsThroughPlacementInForce) {
  Placement a = Placement::trivial(1, 2, 4, 2);  // slots -> 0 1 0 1
  Placement b = a;
  b.layer(0)[2] = 1, b.layer(0)[1] = 0;          // slots -> 0 0 1 1
  Recorder r(1, 4, RecorderMode::stat, 2);
  r.start();
  const int32_t c[4] = {1, 2, 3, 4};
  r.end_pass(a, c);  // logical {4, 6}
  r.end_pass(b, c);  // logical {3, 7}
  auto d = r.dump();
  EXPECT_EQ(d.passes, 1);
  EXPECT_EQ(d.at(0, 0)[0], 7);
  EXPECT_EQ(d.at(0, 0)[1], 13);
  r.end_pass(a, c);  // window of 2 drops the first pass
  d = r.dump();
  EXPECT_EQ(d.at(0, 0)[0], 7);
  EXPECT_EQ(d.at(0, 0)[1], 13);
  EXPECT_EQ(r.passes(), 2);
  r.reset();
  EXPECT_EQ(r.passes(), 0);
}

TEST(Recorder, StopAndPause) {
  Placement a = Placement::trivial(1, 2, 2, 1);
  Recorder r(1, 2, RecorderMode::per_pass, 10);
  const int32_t c[2] = {1, 1};
  r.end_pass(a, c);  // not started
  EXPECT_EQ(r.passes(), 0);
  r.start();
  {
    auto guard = r.pause();
    EXPECT_TRUE(r.paused());
    r.end_pass(a, c);
  }
  EXPECT_FALSE(r.paused());
  r.end_pass(a, c);
  r.stop();
  r.end_pass(a, c);  // stopped
  auto d = r.dump();
  EXPECT_EQ(d.passes, 2);
  EXPECT_EQ(d.at(0, 0)[0], 0);  // paused pass
  EXPECT_EQ(d.at(1, 0)[0], 1);
}

TEST(Recorder, PerTokenKeepsIdsAndControlIsThreadSafe) {
  Placement a = Placement::trivial(2, 8, 8, 4);
  Recorder r(2, 8, RecorderMode::per_token, 4);
  r.start();
  // One thread closes passes (the engine) while others dump (a server's handlers).
  std::atomic<bool> done{false};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t)
    readers.emplace_back([&] {
      while (!done.load()) {
        const auto d = r.dump();
        ASSERT_LE(d.passes, 4);
        (void)r.dump_tokens();
      }
    });
  std::vector<int32_t> counts(16, 0);
  std::vector<std::vector<int32_t>> tokens(2);
  for (int i = 0; i < 1000; ++i)
    for (int l = 0; l < 2; ++l) {
      tokens[size_t(l)].push_back(i % 8), tokens[size_t(l)].push_back((i + 1) % 8);
      ++counts[size_t(l * 8 + i % 8)], ++counts[size_t(l * 8 + (i + 1) % 8)];
    }
  for (int p = 0; p < 50; ++p) r.end_pass(a, counts, tokens);
  done.store(true);
  for (auto& x : readers) x.join();
  auto d = r.dump();
  ASSERT_EQ(d.passes, 4);
  double s = 0;
  for (double x : d.count) s += x;
  EXPECT_EQ(s, 4 * 2 * 2000);
  auto toks = r.dump_tokens();
  ASSERT_EQ(toks.size(), 4u);
  EXPECT_EQ(toks[0][1], tokens[1]);
  EXPECT_THROW(r.end_pass(a, counts, {{1, 9}, {}}), ballast::Error);  // slot 9 of 8
  EXPECT_THROW(parse_recorder_mode("sum"), ballast::Error);
}
