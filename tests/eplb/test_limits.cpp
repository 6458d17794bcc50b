// EPLB inputs at and beyond limits.h (issue 16): load and placement files, plan, replay, synth and
// random dispatch. Each case crashed, hung or allocated without bound at commit 28fc4d2.
#include "ballast/core/clock.h"
#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/limits.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/placement.h"
#include "ballast/eplb/plan.h"
#include "ballast/eplb/replay.h"
#include "ballast/eplb/synth.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "support/expect_error.h"

namespace ballast::eplb {
namespace {

using test::expect_error;

// A load .safetensors file with the given header entry for logical_count and `data` bytes.
std::string load_file(const std::string& name, const std::string& entry, const std::string& data = "") {
  const auto path = (std::filesystem::temp_directory_path() / ("ballast_limits_" + name)).string();
  std::string header = "{\"logical_count\":" + entry + "}";
  uint64_t n = header.size();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(&n), 8);
  f << header << data;
  return path;
}

TEST(EplbLimits, LoadFileShapesAndFieldsAreChecked) {
  expect_error([] { read_load(load_file("a.safetensors", R"({"dtype":"I32","shape":[4611686018427387904,1,1],"data_offsets":[0,0]})")); },
               {"beyond the limits"});
  expect_error([] { read_load(load_file("b.safetensors", R"({"dtype":"I32","shape":[4611686018427387905,1,1],"data_offsets":[0,0]})")); },
               {"beyond the limits"});
  expect_error([] { read_load(load_file("c.safetensors", R"({"shape":[1,2,2],"data_offsets":[0,16]})", std::string(16, '\0'))); },
               {"no \"dtype\""});
  expect_error([] { read_load(load_file("d.safetensors", R"({"dtype":"I32","shape":[1099511627776,1099511627776,1099511627776],"data_offsets":[0,0]})")); },
               {"beyond the limits"});
  expect_error([] { read_load(load_file("e.safetensors", R"({"dtype":"I32","shape":[1,1,2],"data_offsets":[8,0]})", std::string(8, '\0'))); },
               {"offsets do not match"});
  expect_error([] { read_load(load_file("f.safetensors", R"({"dtype":"I32","shape":"x","data_offsets":[0,8]})", std::string(8, '\0'))); },
               {"\"shape\" array"});
  expect_error([] { read_load(load_file("g.safetensors", R"([1,2])")); }, {"not an object"});
  // A good file of the same kind loads.
  int32_t counts[4] = {1, 2, 3, 4};
  const auto t = read_load(load_file("ok.safetensors", R"({"dtype":"I32","shape":[2,2],"data_offsets":[0,16]})",
                                     std::string(reinterpret_cast<const char*>(counts), 16)));
  EXPECT_EQ(t.layers, 2);
  EXPECT_EQ(t.count, (std::vector<double>{1, 2, 3, 4}));
}

TEST(EplbLimits, CountsAreFiniteWholeAndBelow2To53) {
  expect_error([] { load_from_json_text(R"({"logical_count": [[1e308, 1]]})"); }, {"<= 2^53"});
  LoadTrace t(1, 1, 2);
  t.count = {1e300, 1};
  expect_error([&] { t.validate(); }, {"<= 2^53"});
  expect_error([] { LoadTrace(1 << 20, 1 << 10, 1 << 10); }, {"more than the limit"});
  // Whole counts only, reported as such (1e308 was "not a whole number" after a wrapped cast).
  const std::vector<int32_t> row{0, 1, 0, 1};
  const double half[2] = {0.5, 1};
  expect_error([&] { dispatch_random(row, half, 2, 0); }, {"not a whole number"});
}

TEST(EplbLimits, PlacementFilesAreCheckedEntryByEntry) {
  expect_error([] { placement_from_json_text(R"({"physical_to_logical_map": [[0,1,2,2147483647]]})", 1, "cur.json"); },
               {"cur.json", "[0][3] is 2147483647"});
  expect_error([] { placement_from_json_text(R"({"physical_to_logical_map": [[0,1,2,3]], "num_ranks": "x"})", 0, "p"); },
               {"num_ranks must be an integer", "\"x\""});
  expect_error([] { placement_from_json_text(R"({"physical_to_logical_map": [[0,1,2,3]], "num_ranks": 4})", 2, "p"); },
               {"num_ranks is 4 but 2 ranks"});
  EXPECT_EQ(placement_from_json_text(R"({"physical_to_logical_map": [[0,1,2,3]], "num_ranks": 4})", 0).ranks, 4);
  EXPECT_EQ(placement_from_json_text(R"({"physical_to_logical_map": [[0,1,2,3]], "num_ranks": 4})", 4).ranks, 4);
  expect_error([] { Placement(1, 4, 1 << 20, 4); }, {"beyond the limits"});
}

TEST(EplbLimits, PlanAndReplayRefuseSizesBeyondTheLimits) {
  const LoadTrace load = load_from_json_text(R"({"logical_count": [[1,2,3,4],[4,3,2,1]]})");
  PlanOptions po;
  po.ranks = 1, po.redundant = 2147483647 - 4;
  expect_error([&] { plan(load, po); }, {"more than the limit"});
  po.ranks = 1000000, po.redundant = 999996;
  expect_error([&] { plan(load, po); }, {"1000000 ranks"});
  po.ranks = 2, po.redundant = 0, po.migration_weight = std::nan("");
  expect_error([&] { plan(load, po); }, {"migration weight"});
  ReplayOptions ro;
  ro.ranks = 0, ro.redundant = 0;
  expect_error([&] { replay(load, ro); }, {"ranks must be in"});
  ro.ranks = 2, ro.ranks_per_node = 3;
  expect_error([&] { replay(load, ro); }, {"nodes of 3"});
}

TEST(EplbLimits, RandomDispatchOfHugeCountsTakesNoTimePerToken) {
  // 1e15 tokens over 3 replicas: split in O(replicas), every token placed, near-even.
  const std::vector<int32_t> row{0, 1, 0, 0};
  const double counts[2] = {1e15, 7};
  const double t0 = now_seconds();
  const auto slots = dispatch_random(row, counts, 2, 42);
  EXPECT_LT(seconds_since(t0), 1.0);
  EXPECT_EQ(slots[0] + slots[2] + slots[3], 1e15);
  EXPECT_EQ(slots[1], 7);
  for (int s : {0, 2, 3}) EXPECT_NEAR(slots[s] / 1e15, 1.0 / 3, 1e-3);
  EXPECT_EQ(dispatch_random(row, counts, 2, 42), slots);  // deterministic
}

TEST(EplbLimits, SynthRefusesNonFiniteNoise) {
  SynthSpec s = model_shape("deepseek-v3");
  s.layers = 1, s.passes = 3;
  for (double SynthSpec::*field : {&SynthSpec::skew, &SynthSpec::drift, &SynthSpec::burst, &SynthSpec::trend}) {
    for (double bad : {std::nan(""), HUGE_VAL}) {
      SynthSpec b = s;
      b.*field = bad;
      expect_error([&] { synth_trace(b); }, {"finite number"});
    }
  }
  s.passes = 1 << 30;
  expect_error([&] { synth_trace(s); }, {"counts [T][L][E]"});
}

}  // namespace
}  // namespace ballast::eplb
