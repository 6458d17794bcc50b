#include "ballast/core/error.h"
#include "ballast/eplb/ballast_algorithm.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/migration.h"
#include "ballast/eplb/plan.h"
#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/replay.h"
#include "ballast/eplb/synth.h"

#include <gtest/gtest.h>

#include <cmath>
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

// Passes [from, to) of one layer's counts [T][E] (synth_layer) as a one-layer trace.
static LoadTrace window_of(const std::vector<double>& counts, int experts, int from, int to) {
  LoadTrace w(to - from, 1, experts);
  std::copy(counts.begin() + size_t(from) * experts, counts.begin() + size_t(to) * experts, w.count.begin());
  return w;
}

// The toy case of docs/eplb.md: deepseek's max/mean is 1.28, the optimum 1.085.
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

// Static dispatch sends each source rank's tokens of an expert to one replica, so replicas of one
// expert carry unequal shares when their count does not divide G; the static polish plans for
// those shares. On a small fixed Zipf workload (the case where ballast trailed deepseek before
// the polish and the fair static table), ballast must match or beat deepseek per pass with
// static dispatch, in-sample and on later passes, keep replicas on distinct ranks and not lose
// in-sample (window sum) balance.
TEST(Ballast, PerPassStaticAtLeastDeepseekOnZipf) {
  SynthSpec sp = model_shape("deepseek-v3");
  sp.popularity = Popularity::zipf, sp.skew = 0.9, sp.passes = 600, sp.experts = 256;
  const int G = 32, R = 32, E = sp.experts, W = 300, L = 4;
  double in_pass[2] = {}, out_pass[2] = {}, in_sum[2] = {};  // means over layers, as the suite
  for (int l = 0; l < L; ++l) {
    auto counts = synth_layer(sp, l);
    LoadTrace win = window_of(counts, E, 0, W);
    LoadTrace sum = win.sum();
    for (int a = 0; a < 2; ++a) {
      PlanOptions po;
      po.algorithm = a == 0 ? Algorithm::deepseek : Algorithm::ballast, po.ranks = G, po.redundant = R;
      Placement pl = plan(win, po);
      if (a == 1) expect_distinct_ranks(pl);
      auto row = pl.layer(0);
      in_sum[a] += balancedness(rank_loads_even(row, G, sum.at(0, 0), E)) / L;
      in_pass[a] += mean_pass_balancedness(row, G, 0, Dispatch::static_, counts.data(), W, E, E) / L;
      out_pass[a] += mean_pass_balancedness(row, G, 0, Dispatch::static_, counts.data() + size_t(W) * E,
                                           sp.passes - W, E, E) / L;
    }
  }
  EXPECT_GE(in_sum[1], in_sum[0]);
  EXPECT_GE(in_pass[1], in_pass[0]);
  EXPECT_GE(out_pass[1], out_pass[0]);
}

// Without the polish ballast's plan is what it was; with it the largest rank load under static
// dispatch on the planned load never rises.
TEST(Ballast, StaticPolishLowersStaticMax) {
  SynthSpec sp = model_shape("qwen3-next");
  sp.popularity = Popularity::zipf, sp.skew = 0.9, sp.passes = 200;
  const int G = 64, E = sp.experts, P = E + 64;
  auto counts = synth_layer(sp, 0);
  std::vector<double> sum(E, 0.0);
  for (int t = 0; t < sp.passes; ++t)
    for (int e = 0; e < E; ++e) sum[e] += counts[size_t(t) * E + e];
  auto static_max = [&](const std::vector<int32_t>& row) {
    auto rl = rank_loads_from_slots(dispatch_static(row, G, 0, sum.data(), E), G);
    return *std::max_element(rl.begin(), rl.end());
  };
  BallastOptions bo;
  bo.ranks = G, bo.physical = P, bo.static_polish = false;
  auto plain = ballast_layer(sum.data(), 1, E, E, bo);
  bo.static_polish = true;
  auto polished = ballast_layer(sum.data(), 1, E, E, bo);
  EXPECT_LT(static_max(polished), static_max(plain));
  std::set<std::pair<int, int>> seen;
  for (int p = 0; p < P; ++p) EXPECT_TRUE(seen.insert({p / (P / G), polished[p]}).second);
}

// Planned for balanced dispatch, every further replica joins two components of the replica graph:
// R >= G - 1 redundant slots link all ranks, fewer leave exactly G - R components. Planned for
// static dispatch (the same loads) the graph stays split.
TEST(Ballast, PlannedForBalancedLinksAllRanks) {
  struct Case { const char* model; Popularity pop; double skew; int G, R, E; };
  for (Case c : {Case{"qwen3-next", Popularity::lognormal, 1.0, 64, 64, 512}, Case{"deepseek-v3", Popularity::zipf, 0.9, 32, 32, 256},
                 Case{"deepseek-v3", Popularity::lognormal, 0.5, 32, 16, 240}}) {
    SynthSpec sp = model_shape(c.model);
    sp.popularity = c.pop, sp.skew = c.skew, sp.passes = 100, sp.tokens = 4096, sp.experts = c.E;
    LoadTrace w = window_of(synth_layer(sp, 0), sp.experts, 0, 100);
    PlanOptions po;
    po.ranks = c.G, po.redundant = c.R;
    po.dispatch = Dispatch::static_;
    Placement for_static = plan(w, po);
    po.dispatch = Dispatch::balanced;
    Placement for_balanced = plan(w, po);
    for_balanced.validate();
    expect_distinct_ranks(for_balanced);
    EXPECT_EQ(replica_graph_components(for_balanced.layer(0), c.G, sp.experts), std::max(1, c.G - c.R)) << c.model;
    if (c.R >= c.G - 1) {  // (with few redundant slots chance alone often joins them all)
      EXPECT_GT(replica_graph_components(for_static.layer(0), c.G, sp.experts), 1) << c.model;
    }
  }
}

// The target: with balanced dispatch, per-pass balancedness >= 0.97 on later passes where
// deepseek's placement with static dispatch stays in 0.90-0.95 (Zipf 0.9, deepseek-v3 shape).
TEST(Ballast, PlannedForBalancedMeetsPerPassTarget) {
  SynthSpec sp = model_shape("deepseek-v3");
  sp.popularity = Popularity::zipf, sp.skew = 0.9, sp.passes = 400;
  const int G = 32, R = 32, E = sp.experts, W = 200, L = 2;
  double ours = 0, theirs_static = 0, theirs_balanced = 0;
  for (int l = 0; l < L; ++l) {
    auto counts = synth_layer(sp, l);
    LoadTrace win = window_of(counts, E, 0, W);
    const double* later = counts.data() + size_t(W) * E;
    PlanOptions po;
    po.ranks = G, po.redundant = R, po.dispatch = Dispatch::balanced;
    Placement mine = plan(win, po);
    ours += mean_pass_balancedness(mine.layer(0), G, 0, Dispatch::balanced, later, sp.passes - W, E, E) / L;
    po.algorithm = Algorithm::deepseek;
    Placement deepseek = plan(win, po);
    auto ds = deepseek.layer(0);
    theirs_static += mean_pass_balancedness(ds, G, 0, Dispatch::static_, later, sp.passes - W, E, E) / L;
    theirs_balanced += mean_pass_balancedness(ds, G, 0, Dispatch::balanced, later, sp.passes - W, E, E) / L;
  }
  EXPECT_GE(ours, 0.97);
  EXPECT_LT(theirs_static, 0.95);
  EXPECT_GT(ours, theirs_balanced);
}

// Re-planning for balanced dispatch from a placement in force: a linked current placement is kept
// where balance costs little (migration weight), an unlinked one (trivial) is replaced by a linked one.
TEST(Ballast, PlannedForBalancedWithCurrentPlacement) {
  SynthSpec sp = model_shape("deepseek-v3");
  sp.layers = 1, sp.passes = 200, sp.tokens = 4096, sp.drift = 0.05;
  auto trace = synth_trace(sp);
  const int G = 32, E = sp.experts;
  PlanOptions po;
  po.ranks = G, po.redundant = 32, po.slices = 1, po.dispatch = Dispatch::balanced;
  Placement trivial = Placement::trivial(1, E, E + 32, G);
  po.current = &trivial;
  Placement first = plan(trace.range(0, 100), po);
  EXPECT_EQ(replica_graph_components(first.layer(0), G, E), 1);
  po.current = &first;
  Placement free_move = plan(trace.range(100, 200), po);
  po.migration_weight = 0.5;
  Placement sticky = plan(trace.range(100, 200), po);
  EXPECT_EQ(replica_graph_components(free_move.layer(0), G, E), 1);
  EXPECT_EQ(replica_graph_components(sticky.layer(0), G, E), 1);
  EXPECT_LT(plan_migration(first, sticky, 0).experts_moved, plan_migration(first, free_move, 0).experts_moved);
}

// Step 8: with nodes, each expert group (and its replicas) stays on the node its group was packed
// onto, and the plan balances at least as well as deepseek's hierarchical policy.
TEST(Ballast, NodeHierarchy) {
  std::mt19937_64 rng(11);
  std::lognormal_distribution<double> ln(0.0, 1.0);
  const int L = 3, E = 64, G = 16, P = 96, N = 2, NG = 8;
  LoadTrace load(1, L, E);
  for (auto& x : load.count) x = std::round(100 * ln(rng));
  PlanOptions po;
  po.algorithm = Algorithm::ballast, po.ranks = G, po.redundant = P - E, po.nodes = N, po.groups = NG;
  Placement b = plan(load, po);
  b.validate();
  po.algorithm = Algorithm::deepseek_hierarchical;
  Placement d = plan(load, po);
  for (int l = 0; l < L; ++l) {
    std::vector<int> node_of_group(NG, -1);
    for (int p = 0; p < P; ++p) {
      const int g = b.layer(l)[p] / (E / NG), n = p / (P / N);
      if (node_of_group[g] < 0) node_of_group[g] = n;
      EXPECT_EQ(node_of_group[g], n) << "layer " << l << " slot " << p;
    }
  }
  EXPECT_GE(evaluate_even(b, load).mean, evaluate_even(d, load).mean - 1e-12);
  // Groups that do not divide over the nodes are refused (no silent global fallback).
  po.groups = 3;
  EXPECT_THROW(plan(load, po), ballast::Error);
  po.algorithm = Algorithm::ballast;
  po.groups = 4, po.nodes = 8;
  EXPECT_THROW(plan(load, po), ballast::Error);
}

TEST(Metrics, MeasuredBalance) {
  const double tokens[] = {100, 0, 0, 0, 100, 0, 0, 0};  // vLLM's test: [2 layers][4 ranks]
  auto m = measured_balance(tokens, 2, 4);
  EXPECT_EQ(m.avg_tokens, 50);
  EXPECT_EQ(m.max_tokens, 200);
  EXPECT_EQ(m.balancedness, 0.25);
  const double mixed[] = {10, 10, 30, 10, 0, 0};
  auto n = measured_balance(mixed, 3, 2);
  EXPECT_DOUBLE_EQ(n.balancedness, 30.0 / 40.0);  // sum of means / sum of maxes
  EXPECT_DOUBLE_EQ(n.mean, (1 + 2.0 / 3 + 1) / 3);  // SGLang's mean over layers
  const double bad[] = {1, -1};
  EXPECT_THROW(measured_balance(bad, 1, 2), ballast::Error);
}

// Issue 17's static-dispatch exception (docs/eplb.md): on deepseek-v3/lognormal-1.0 without drift,
// first 16 layers, the window plan was below deepseek per pass out of sample (0.9142 vs 0.9148).
// Planned also for the window's recent level (the default) it is above, and keeps the window's
// balance (its sum, even splits) at least deepseek's.
TEST(Ballast, PerPassStaticAboveDeepseekOutOfSampleOnTheDocsException) {
  auto suite = default_suite(1000, 1000);
  const SuiteWorkload* w = nullptr;
  for (const auto& x : suite)
    if (x.spec.name == "deepseek-v3/lognormal-1.0") w = &x;
  ASSERT_NE(w, nullptr);
  const int G = w->ranks, R = w->redundant, E = w->spec.experts, W = 1000, L = 16;
  double out[3] = {}, in_sum[3] = {};  // deepseek, ballast (window only), ballast (default)
  for (int l = 0; l < L; ++l) {
    auto counts = synth_layer(w->spec, l);
    LoadTrace win = window_of(counts, E, 0, W);
    LoadTrace sum = win.sum();
    for (int a = 0; a < 3; ++a) {
      PlanOptions po;
      po.algorithm = a == 0 ? Algorithm::deepseek : Algorithm::ballast, po.ranks = G, po.redundant = R;
      po.expect_recent_level = a == 2;
      Placement pl = plan(win, po);
      auto row = pl.layer(0);
      in_sum[a] += balancedness(rank_loads_even(row, G, sum.at(0, 0), E)) / L;
      out[a] += mean_pass_balancedness(row, G, 0, Dispatch::static_, counts.data() + size_t(W) * E, W, E, E) / L;
    }
  }
  EXPECT_NEAR(out[0], 0.9148, 5e-5);  // the docs' figures
  EXPECT_NEAR(out[1], 0.9142, 5e-5);
  EXPECT_GT(out[2], out[0] + 0.005);
  EXPECT_GE(in_sum[2], in_sum[0]);
}
