#include "ballast/core/error.h"
#include "ballast/eplb/ballast_algorithm.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/migration.h"
#include "ballast/eplb/plan.h"
#include "ballast/eplb/synth.h"

#include <gtest/gtest.h>

#include <random>
#include <set>

using namespace ballast::eplb;

static double max_over_mean(const Placement& p, const LoadTrace& load, int l = 0) {
  auto rl = rank_loads_even(p.layer(l), p.ranks, load.at(0, l), p.logical);
  return 1.0 / balancedness(rl);
}

static void expect_distinct_ranks(const Placement& p) {
  for (int l = 0; l < p.layers; ++l) {
    std::set<std::pair<int, int>> seen;
    auto row = p.layer(l);
    for (int s = 0; s < p.physical; ++s)
      EXPECT_TRUE(seen.insert({p.rank_of(s), row[s]}).second) << "layer " << l << " rank " << p.rank_of(s)
                                                                  << " holds expert " << row[s] << " twice";
  }
}

// The toy case of spec/EPLB.md: deepseek's max/mean is 1.28, the optimum 1.085.
TEST(Ballast, ToyCaseBeatsDeepseek) {
  LoadTrace load(1, 1, 8);
  double w[] = {600, 560, 120, 120, 20, 10, 10, 10};
  std::copy(w, w + 8, load.at(0, 0));
  PlanOptions po;
  po.ranks = 8, po.redundant = 8;
  po.algorithm = Algorithm::deepseek;
  double ds = max_over_mean(plan(load, po), load);
  po.algorithm = Algorithm::ballast;
  auto pb = plan(load, po);
  pb.validate();
  expect_distinct_ranks(pb);
  double ours = max_over_mean(pb, load);
  EXPECT_NEAR(ds, 1.28, 0.005);
  EXPECT_LE(ours, 1.0855);
}

TEST(Ballast, NeverWorseThanDeepseekOnRandomLayers) {
  std::mt19937_64 rng(5);
  for (int c = 0; c < 60; ++c) {
    int G = 1 << (rng() % 4 + 1), K = int(rng() % 4) + 2, P = G * K;
    int E = std::max(1, P - int(rng() % (G + 1)));
    LoadTrace load(1, 1, E);
    std::lognormal_distribution<double> ln(3.0, c % 2 ? 1.5 : 0.6);
    for (int e = 0; e < E; ++e) load.at(0, 0)[e] = std::floor(ln(rng));
    PlanOptions po;
    po.ranks = G, po.redundant = P - E;
    po.algorithm = Algorithm::deepseek;
    auto pd = plan(load, po);
    double ds = max_over_mean(pd, load);
    po.algorithm = Algorithm::ballast;
    auto pb = plan(load, po);
    pb.validate();
    if (int64_t(G) * E >= P) expect_distinct_ranks(pb);
    // Where deepseek puts two replicas of an expert on one rank it splits that expert unevenly
    // (2/3 : 1/3), which ballast forbids by design; compare only where deepseek keeps them apart.
    std::set<std::pair<int, int>> seen;
    bool distinct = true;
    for (int s = 0; s < P; ++s) distinct &= seen.insert({pd.rank_of(s), pd.layer(0)[s]}).second;
    if (!distinct) continue;
    EXPECT_LE(max_over_mean(pb, load), ds + 1e-9) << "case " << c << " G=" << G << " P=" << P << " E=" << E;
  }
}

TEST(Ballast, DeterministicAndValidOnSyntheticModelShape) {
  SynthSpec s = model_shape("deepseek-v3");
  s.layers = 3, s.passes = 64, s.tokens = 2048;
  auto trace = synth_trace(s);
  PlanOptions po;
  po.ranks = 32, po.redundant = 32;
  auto a = plan(trace, po), b = plan(trace, po);
  EXPECT_EQ(a, b);
  a.validate();
  expect_distinct_ranks(a);
  auto sum = trace.sum();
  auto bal = evaluate_even(a, sum);
  po.algorithm = Algorithm::deepseek;
  auto d = evaluate_even(plan(trace, po), sum);
  EXPECT_GE(bal.mean, d.mean - 1e-3);  // ballast optimises the slices, still as good on the sum
}

TEST(Ballast, MigrationWeightKeepsPlacementWhenBalanceCostsLittle) {
  SynthSpec s = model_shape("deepseek-v3");
  s.layers = 2, s.passes = 200, s.tokens = 4096, s.drift = 0.05;
  auto trace = synth_trace(s);
  PlanOptions po;
  po.ranks = 32, po.redundant = 32, po.slices = 1;
  Placement first = plan(trace.range(0, 100), po);
  po.current = &first;
  po.migration_weight = 0.0;
  Placement free_move = plan(trace.range(100, 200), po);
  po.migration_weight = 0.5;
  Placement sticky = plan(trace.range(100, 200), po);
  int moved_free = plan_migration(first, free_move, 0).experts_moved;
  int moved_sticky = plan_migration(first, sticky, 0).experts_moved;
  EXPECT_LT(moved_sticky, moved_free);
  // and relabelling alone (weight 0) already keeps most experts where they are
  po.current = nullptr;
  Placement fresh = plan(trace.range(100, 200), po);
  EXPECT_LE(moved_free, plan_migration(first, fresh, 0).experts_moved);
  auto sum = trace.range(100, 200).sum();
  EXPECT_GE(evaluate_even(sticky, sum).mean, 0.9);
}

TEST(Ballast, RefusesBadInput) {
  LoadTrace load(1, 1, 8);
  PlanOptions po;
  po.ranks = 3, po.redundant = 0;
  EXPECT_THROW(plan(load, po), ballast::Error);  // 8 % 3
  po.ranks = 4, po.redundant = -1;
  EXPECT_THROW(plan(load, po), ballast::Error);
  po.redundant = 0;
  load.at(0, 0)[2] = -1;
  EXPECT_THROW(plan(load, po), ballast::Error);
  EXPECT_THROW(parse_algorithm("greedy"), ballast::Error);
}
