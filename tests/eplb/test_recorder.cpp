#include "ballast/core/error.h"
#include "ballast/eplb/recorder.h"

#include <gtest/gtest.h>

#include <thread>

using namespace ballast::eplb;

TEST(Recorder, StatWindowConvertsThroughPlacementInForce) {
  Placement a = Placement::trivial(1, 2, 4, 2);  // slots -> 0 1 0 1
  Placement b = a;
  b.layer(0)[2] = 1, b.layer(0)[1] = 0;          // slots -> 0 0 1 1
  Recorder r(1, 4, RecorderMode::stat, 2);
  r.start();
  int64_t c[4] = {1, 2, 3, 4};
  r.record_slot_counts(0, c);
  r.end_pass(a);  // logical {4, 6}
  r.record_slot_counts(0, c);
  r.end_pass(b);  // logical {3, 7}
  auto d = r.dump();
  EXPECT_EQ(d.passes, 1);
  EXPECT_EQ(d.at(0, 0)[0], 7);
  EXPECT_EQ(d.at(0, 0)[1], 13);
  r.record_slot_counts(0, c);
  r.end_pass(a);  // window of 2 drops the first pass
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
  int64_t c[2] = {1, 1};
  r.record_slot_counts(0, c);  // not started
  r.end_pass(a);
  EXPECT_EQ(r.passes(), 0);
  r.start();
  {
    auto guard = r.pause();
    EXPECT_TRUE(r.paused());
    r.record_slot_counts(0, c);
  }
  EXPECT_FALSE(r.paused());
  r.end_pass(a);
  r.record_slot_counts(0, c);
  r.end_pass(a);
  r.stop();
  auto d = r.dump();
  EXPECT_EQ(d.passes, 2);
  EXPECT_EQ(d.at(0, 0)[0], 0);  // paused pass
  EXPECT_EQ(d.at(1, 0)[0], 1);
}

TEST(Recorder, PerTokenKeepsIdsAndThreadsAreSafe) {
  Placement a = Placement::trivial(2, 8, 8, 4);
  Recorder r(2, 8, RecorderMode::per_token, 4);
  r.start();
  std::vector<std::thread> th;
  for (int t = 0; t < 4; ++t)
    th.emplace_back([&, t] {
      std::vector<int32_t> ids;
      for (int i = 0; i < 1000; ++i) ids.push_back((i + t) % 8), ids.push_back((i + t + 1) % 8);
      for (int l = 0; l < 2; ++l) r.record_topk(l, ids, 2);
    });
  for (auto& x : th) x.join();
  r.end_pass(a);
  auto d = r.dump();
  double s = 0;
  for (double x : d.count) s += x;
  EXPECT_EQ(s, 4 * 2 * 2000);
  auto toks = r.dump_tokens();
  ASSERT_EQ(toks.size(), 1u);
  EXPECT_EQ(toks[0][1].size(), 8000u);
  EXPECT_THROW(r.record_topk(0, std::vector<int32_t>{1, 2, 3}, 2), ballast::Error);
  EXPECT_THROW(parse_recorder_mode("sum"), ballast::Error);
}
