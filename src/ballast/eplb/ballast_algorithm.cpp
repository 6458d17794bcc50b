#include "ballast/eplb/ballast_algorithm.h"

#include "ballast/core/error.h"
#include "ballast/eplb/ballast_packing.h"
#include "ballast/eplb/ballast_static_polish.h"
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/metrics.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

namespace ballast::eplb {
namespace {

using namespace ballast_detail;

// ballast_layer with the polish's scratch of the caller's.
std::vector<int32_t> plan_layer(const double* slices, int S, int E, size_t stride, const BallastOptions& opt,
                                const int32_t* current_row, LayerPlanStats* stats, const double* expected,
                                PolishScratch& scratch) {
  const int G = opt.ranks, P = opt.physical;
  check(G > 0 && S > 0 && E > 0, "ballast: bad shape (ranks {}, slices {}, experts {})", G, S, E);
  check(P % G == 0, "ballast: {} physical slots are not divisible by {} ranks", P, G);
  check(P >= E, "ballast: {} physical slots are fewer than {} logical experts", P, E);
  check(opt.migration_weight >= 0, "ballast: migration weight must be >= 0");
  Problem pr;
  pr.S = S, pr.E = E, pr.P = P, pr.G = G, pr.K = P / G;
  pr.w.resize(size_t(E) * S);
  pr.agg.assign(E, 0.0);
  for (int s = 0; s < S; ++s)
    for (int e = 0; e < E; ++e) {
      double x = slices[s * stride + e];
      check(std::isfinite(x) && x >= 0, "ballast: load {} of expert {} in slice {} is not a count >= 0", x, e, s);
      pr.w[size_t(e) * S + s] = x;
      pr.agg[e] += x;
    }
  for (int s = 0; s < S; ++s) pr.bound += max_load_lower_bound(slices + s * stride, E, P, G);
  std::vector<double> expected_w;
  if (expected) {
    expected_w.assign(expected, expected + E);
    for (int e = 0; e < E; ++e)
      check(std::isfinite(expected_w[e]) && expected_w[e] >= 0, "ballast: expected load {} of expert {} is not >= 0",
            expected_w[e], e);
  }
  // Loads are in their own units; the migration penalty is in units of the bound per slot.
  pr.lambda = opt.migration_weight * (pr.bound > 0 ? pr.bound : 1.0) / P;
  pr.linked = opt.dispatch == Dispatch::balanced && P > E && G > 1;
  if (current_row) {
    pr.has_current = true;
    pr.cur_has.assign(size_t(G) * E, 0);
    for (int p = 0; p < P; ++p) {
      check(current_row[p] >= 0 && current_row[p] < E, "ballast: current placement slot {} holds expert {}", p,
            current_row[p]);
      pr.cur_has[size_t(p / pr.K) * E + current_row[p]] = 1;
    }
  }
  // Counts on the aggregate; the cap G keeps replicas on distinct ranks.
  // (When G * E < P duplicates cannot be avoided and the cap is raised to ceil(P / E).)
  int cap = std::min(P - E + 1, std::max(G, (P + E - 1) / E));
  auto cnt = optimal_replica_counts(pr.agg.data(), E, P, cap);
  // Candidates are built and compared on the aggregate (cheap); slices enter below.
  const Problem pa = S > 1 ? aggregate_problem(pr) : pr;
  Packing cand = pack_and_search(pa, cnt);
  int rounds = opt.count_rounds >= 0 ? opt.count_rounds : (E <= 32 ? 2 * E : 2);
  if (cand.F > pa.bound * 1.002) cand = search_counts(pa, std::move(cand), rounds);
  if (cand.F > pa.bound * 1.001 && E <= 128 && !pr.linked) {
    // Small layers: also start from deepseek's placement when it keeps replicas on distinct
    // ranks, so that ballast is never worse than it there (its replicas do not link the ranks).
    Packing ds = from_row(pa, deepseek_slots(pa).data());
    bool distinct = true;
    for (uint8_t h : ds.has) distinct &= h <= 1;
    if (distinct) {
      local_search(pa, ds);
      if (better(pa, ds, cand)) cand = std::move(ds);
    }
  }
  Packing best = S > 1 ? rescore(pr, cand) : std::move(cand);
  if (S > 1) local_search(pr, best);
  if (current_row) {
    Packing fresh = from_row(pr, relabel(pr, best, current_row).data());
    local_search(pr, fresh);
    Packing kept = from_row(pr, current_row);
    local_search(pr, kept);
    // For balanced dispatch fewer components first: a split graph caps every pass's balance.
    auto components = [&](const Packing& pk) { return pr.linked ? replica_graph_components(pk.slot, G, E) : 0; };
    const int ck = components(kept), cf = components(fresh);
    best = ck != cf ? (ck < cf ? std::move(kept) : std::move(fresh))
           : better(pr, kept, fresh) ? std::move(kept) : std::move(fresh);
  }
  if (opt.static_polish && !pr.linked && P > E && G > 1) {
    // Static dispatch's shares (StaticLoads) on the aggregate, or on the loads expected next; with
    // a current placement only when it moves no more experts.
    Packing polished = best;
    const double amax = *std::max_element(best.A.begin(), best.A.end());
    double even_cap = amax * (1 + opt.static_even_slack);
    int iters = G;
    int64_t budget = opt.static_budget * int64_t(P);
    if (expected) {
      // The aggregate may give up a little of its balance for the expected loads': up to
      // expected_slack above its bound, never above deepseek's plan of it (so the window's balance
      // stays at least deepseek's), nor below the plan's own maximum.
      const Packing ds = from_row(pa, deepseek_slots(pa).data());
      const double ds_max = *std::max_element(ds.A.begin(), ds.A.end());
      even_cap = std::max(even_cap, std::min(pa.bound * (1 + opt.expected_slack), ds_max));
      iters = opt.expected_iterations * G, budget = opt.expected_budget * int64_t(P);
    }
    // With a current placement: the expected loads' polish swaps only where no more experts move;
    // the aggregate's is kept only when it moves no more in all.
    if (static_polish(pr, polished, expected ? expected_w.data() : pr.agg.data(), even_cap, iters, budget, scratch,
                      /*keep_moves=*/expected != nullptr) > 0 &&
        (!current_row || polished.moved <= best.moved))
      best = std::move(polished);
  }
  std::vector<int32_t> row = best.slot;
  if (stats) stats->score = best.F, stats->bound = pr.bound, stats->moved = best.moved;
  return row;
}

// Step 8 (ballast_algorithm.h): groups onto nodes, then ballast_layer inside each node.
std::vector<int32_t> ballast_layer_nodes(const double* slices, int S, int E, size_t stride, const BallastOptions& opt,
                                         const int32_t* current_row, LayerPlanStats* stats, const double* expected,
                                         PolishScratch& scratch) {
  const int N = opt.nodes, NG = opt.groups, G = opt.ranks, P = opt.physical;
  check(NG > 0 && E % NG == 0, "ballast: {} experts are not divisible into {} groups", E, NG);
  check(NG % N == 0, "ballast: {} expert groups are not divisible over {} nodes", NG, N);
  check(G % N == 0, "ballast: {} ranks are not divisible over {} nodes", G, N);
  check(P % G == 0, "ballast: {} physical slots are not divisible by {} ranks", P, G);
  const int gsize = E / NG, En = E / N, Pn = P / N;
  check(Pn >= En, "ballast: {} slots per node are fewer than the {} experts of a node", Pn, En);
  std::vector<float> gw(NG, 0.0f);
  for (int g = 0; g < NG; ++g) {
    double s = 0;
    for (int x = 0; x < S; ++x)
      for (int i = 0; i < gsize; ++i) s += slices[x * stride + g * gsize + i];
    gw[g] = float(s);
  }
  std::vector<int32_t> pack(NG), rank_in_pack(NG);
  deepseek::balanced_packing(gw.data(), NG, N, pack.data(), rank_in_pack.data());
  // Pack -> node: identity, or with a current placement greedily by experts already on the node.
  std::vector<int> node_of(N);
  std::iota(node_of.begin(), node_of.end(), 0);
  if (current_row) {
    std::vector<int> overlap(size_t(N) * N, 0);  // [pack][node]
    for (int p = 0; p < P; ++p) {
      const int e = current_row[p];
      if (e >= 0 && e < E) overlap[size_t(pack[e / gsize]) * N + p / Pn]++;
    }
    std::vector<std::tuple<int, int, int>> pairs;
    for (int a = 0; a < N; ++a)
      for (int n = 0; n < N; ++n) pairs.emplace_back(-overlap[size_t(a) * N + n], a, n);
    std::sort(pairs.begin(), pairs.end());
    std::vector<uint8_t> pack_done(N, 0), node_used(N, 0);
    for (auto [o, a, n] : pairs)
      if (!pack_done[a] && !node_used[n]) node_of[a] = n, pack_done[a] = node_used[n] = 1;
  }
  BallastOptions sub = opt;
  sub.nodes = 1, sub.groups = 1, sub.ranks = G / N, sub.physical = Pn;
  std::vector<int32_t> row(P, -1), local(E, -1);
  std::vector<double> w(size_t(S) * En), ex(En);
  std::vector<int32_t> cur(Pn);
  if (stats) *stats = {};
  for (int a = 0; a < N; ++a) {
    const int n = node_of[a];
    std::vector<int32_t> experts;  // the node's experts, ascending
    for (int e = 0; e < E; ++e)
      if (pack[e / gsize] == a) experts.push_back(e);
    for (int i = 0; i < En; ++i) local[experts[i]] = i;
    for (int x = 0; x < S; ++x)
      for (int i = 0; i < En; ++i) w[size_t(x) * En + i] = slices[x * stride + experts[i]];
    if (expected)
      for (int i = 0; i < En; ++i) ex[i] = expected[experts[i]];
    // The current placement of the node's slots, when they hold only the node's experts.
    bool has_cur = current_row != nullptr;
    for (int p = 0; has_cur && p < Pn; ++p) {
      const int e = current_row[n * Pn + p];
      has_cur = e >= 0 && e < E && pack[e / gsize] == a;
      if (has_cur) cur[p] = local[e];
    }
    LayerPlanStats st;
    auto r = plan_layer(w.data(), S, En, En, sub, has_cur ? cur.data() : nullptr, &st, expected ? ex.data() : nullptr,
                        scratch);
    for (int p = 0; p < Pn; ++p) row[n * Pn + p] = experts[r[p]];
    if (stats) stats->score += st.score, stats->bound += st.bound, stats->moved += st.moved;
  }
  return row;
}

}  // namespace

std::vector<int32_t> ballast_layer(const double* slices, int S, int E, size_t stride, const BallastOptions& opt,
                                   const int32_t* current_row, LayerPlanStats* stats, const double* expected) {
  PolishScratch scratch;
  return plan_layer(slices, S, E, stride, opt, current_row, stats, expected, scratch);
}

Placement ballast_rebalance(const LoadTrace& slices, const BallastOptions& opt, std::vector<LayerPlanStats>* stats) {
  slices.validate("ballast: load");
  Placement out(slices.layers, slices.experts, opt.physical, opt.ranks);
  if (opt.current) {
    const Placement& c = *opt.current;
    check(c.layers == slices.layers && c.logical == slices.experts && c.physical == opt.physical &&
              c.ranks == opt.ranks,
          "ballast: current placement is {} layers x {} experts, {} slots on {} ranks; the plan is for {} x {}, {} "
          "on {}",
          c.layers, c.logical, c.physical, c.ranks, slices.layers, slices.experts, opt.physical, opt.ranks);
  }
  if (opt.expected) {
    const LoadTrace& x = *opt.expected;
    check(x.passes == 1 && x.layers == slices.layers && x.experts == slices.experts &&
              x.count.size() == size_t(x.layers) * x.experts,
          "ballast: expected loads are [{}][{}][{}]; the plan is for [1][{}][{}]", x.passes, x.layers, x.experts,
          slices.layers, slices.experts);
    check(opt.expected_layers.empty() || int(opt.expected_layers.size()) == slices.layers,
          "ballast: expected_layers has {} flags for {} layers", opt.expected_layers.size(), slices.layers);
  }
  if (stats) stats->assign(slices.layers, {});
  const size_t stride = size_t(slices.layers) * slices.experts;
  PolishScratch scratch;  // reused by every layer's plan
  for (int l = 0; l < slices.layers; ++l) {
    const int32_t* cur = opt.current ? opt.current->layer(l).data() : nullptr;
    LayerPlanStats* st = stats ? &(*stats)[l] : nullptr;
    const double* ex = opt.expected && (opt.expected_layers.empty() || opt.expected_layers[l]) ? opt.expected->at(0, l)
                                                                                             : nullptr;
    auto row = opt.nodes > 1
                   ? ballast_layer_nodes(slices.at(0, l), slices.passes, slices.experts, stride, opt, cur, st, ex, scratch)
                   : plan_layer(slices.at(0, l), slices.passes, slices.experts, stride, opt, cur, st, ex, scratch);
    std::copy(row.begin(), row.end(), out.layer(l).begin());
  }
  return out;
}

}  // namespace ballast::eplb
