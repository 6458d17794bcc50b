#include "ballast/core/error.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/placement.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>

using namespace ballast::eplb;

TEST(Placement, TrivialAndDerivedTables) {
  auto p = Placement::trivial(2, 4, 6, 3);
  EXPECT_NO_THROW(p.validate());
  EXPECT_EQ(p.slots_per_rank(), 2);
  EXPECT_EQ(p.rank_of(5), 2);
  EXPECT_EQ(p.replica_count(0), (std::vector<int32_t>{2, 2, 1, 1}));
  auto l2p = p.logical_to_physical(1);
  EXPECT_EQ(l2p[0], (std::vector<int32_t>{0, 4}));
  EXPECT_EQ(l2p[3], (std::vector<int32_t>{3}));
}

TEST(Placement, JsonRoundTripSglangFormat) {
  auto p = Placement::trivial(3, 5, 8, 4);
  auto q = placement_from_json_text(placement_to_json_text(p), 4);
  EXPECT_EQ(p, q);
  auto r = placement_from_json_text(R"({"physical_to_logical_map": [[0,1,2,3],[3,2,1,0]]})", 2);
  EXPECT_EQ(r.logical, 4);
  EXPECT_EQ(r.layer(1)[0], 3);
}

static void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << needle << "'";
  } catch (const ballast::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Placement, RefusesBadInput) {
  expect_error([] { placement_from_json_text(R"({"physical_to_logical_map": [[0,1,2],[0,1]]})", 1); }, "ragged");
  expect_error([] { placement_from_json_text(R"({"physical_to_logical_map": [[0,1,2]]})", 2); }, "not divisible");
  expect_error([] { placement_from_json_text(R"({"physical_to_logical_map": [[0,2,2,0]]})", 2); },
               "no replica of logical expert 1");
  expect_error([] { Placement(1, 8, 6, 2); }, "fewer than 8 logical experts");
  expect_error([] { placement_from_json_text("{", 1); }, "not valid JSON");
}

TEST(Load, ParsesMatrixAndTraceAndRefusesBadInput) {
  auto m = load_from_json_text(R"({"logical_count": [[1,2,3],[4,5,6]]})");
  EXPECT_EQ(m.passes, 1);
  EXPECT_EQ(m.layers, 2);
  EXPECT_EQ(m.at(0, 1)[2], 6);
  auto t = load_from_json_text(R"({"logical_count": [[[1,2]],[[3,4]],[[5,6]]]})");
  EXPECT_EQ(t.passes, 3);
  EXPECT_EQ(t.sum().at(0, 0)[1], 12);
  auto s = t.slices(0, 3, 2);
  EXPECT_EQ(s.passes, 2);
  EXPECT_EQ(s.at(0, 0)[0] + s.at(1, 0)[0], 9);
  expect_error([] { load_from_json_text(R"({"logical_count": [[1,2,3],[4,5]]})"); }, "ragged");
  expect_error([] { load_from_json_text(R"({"logical_count": [[1,-2,3]]})"); }, "counts must be >= 0");
  expect_error([] { load_from_json_text(R"({"logical_count": [[1,"a"]]})"); }, "not a number");
  expect_error([] { load_from_json_text(R"({"other": 1})"); }, "logical_count");
}

// validate() checks blocks of counts on their bits and searches a block only when it may hold a
// bad count: the message names the first bad one in the trace, wherever the blocks fall; -0.0 and
// 2^53 (the largest count held exactly) pass, the next double above it does not.
TEST(Load, ValidateNamesTheFirstBadCount) {
  LoadTrace t(40, 3, 100);  // 12000 counts: three blocks of 4096
  for (size_t i = 0; i < t.count.size(); ++i) t.count[i] = double(i % 13);
  t.at(0, 0)[0] = -0.0;
  t.at(39, 2)[99] = 9007199254740992.0;
  EXPECT_NO_THROW(t.validate());
  for (double bad : {-1.0, -std::numeric_limits<double>::denorm_min(), std::nan(""), HUGE_VAL, -HUGE_VAL,
                     9007199254740994.0, std::numeric_limits<double>::max()}) {
    LoadTrace u = t;
    u.at(27, 1)[42] = bad;  // count 27*300 + 142 = 8242, in the third block
    u.at(35, 2)[5] = -2.0;  // a later bad one in the same block
    try {
      u.validate("trace");
      ADD_FAILURE() << "accepted " << bad;
    } catch (const ballast::Error& e) {
      EXPECT_NE(std::string(e.what()).find("trace: count at pass 27 layer 1 expert 42"), std::string::npos) << e.what();
    }
  }
  LoadTrace edge = t;
  edge.at(13, 1)[95] = -3.0;  // count 13*300 + 195 = 4095, the last of the first block
  edge.at(13, 1)[96] = -4.0;
  try {
    edge.validate();
    ADD_FAILURE();
  } catch (const ballast::Error& e) {
    EXPECT_NE(std::string(e.what()).find("pass 13 layer 1 expert 95"), std::string::npos) << e.what();
  }
}

TEST(Load, SafetensorsRoundTrip) {
  LoadTrace t(3, 2, 4);
  for (size_t i = 0; i < t.count.size(); ++i) t.count[i] = double(i * 7 % 11);
  std::string path = testing::TempDir() + "/trace.safetensors";
  write_load(path, t);
  auto u = read_load(path);
  EXPECT_EQ(u.passes, 3);
  EXPECT_EQ(u.count, t.count);
  std::remove(path.c_str());
}

TEST(Metrics, BalancednessAndBound) {
  std::vector<double> l{1, 2, 3, 2};
  EXPECT_DOUBLE_EQ(balancedness(l), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(imbalance(l), 0.5);
  // One hot expert: 4 experts, 2 ranks, 2 redundant: best counts (3,1,1,1): max(w/c) = 30/3.
  double w[] = {30, 4, 4, 2};
  EXPECT_DOUBLE_EQ(max_load_lower_bound(w, 4, 6, 2), 20.0);
  EXPECT_EQ(optimal_replica_counts(w, 4, 6, 6), (std::vector<int32_t>{3, 1, 1, 1}));
  double u[] = {600, 560, 120, 120, 20, 10, 10, 10};
  EXPECT_DOUBLE_EQ(max_load_lower_bound(u, 8, 16, 8), 181.25);
}
