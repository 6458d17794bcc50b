#include "ballast/eplb/metrics.h"

#include "ballast/core/error.h"

#include <algorithm>
#include <cmath>
#include <numeric>


namespace ballast::eplb {

std::vector<double> rank_loads_even(std::span<const int32_t> row, int ranks, const double* w, int experts) {
  const int P = int(row.size()), K = P / ranks;
  std::vector<int> cnt(experts, 0);
  for (int32_t e : row) cnt[e]++;
  std::vector<double> load(ranks, 0.0);
  for (int p = 0; p < P; ++p) load[p / K] += w[row[p]] / cnt[row[p]];
  return load;
}

std::vector<double> rank_loads_from_slots(std::span<const double> slot_load, int ranks) {
  const int K = int(slot_load.size()) / ranks;
  std::vector<double> load(ranks, 0.0);
  for (size_t p = 0; p < slot_load.size(); ++p) load[p / K] += slot_load[p];
  return load;
}

int replica_graph_components(std::span<const int32_t> row, int G, int E) {
  const int K = int(row.size()) / G;
  std::vector<int> parent(G), first(E, -1);
  std::iota(parent.begin(), parent.end(), 0);
  auto find = [&](int x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  };
  int n = G;
  for (int p = 0; p < int(row.size()); ++p) {
    const int e = row[p], g = p / K;
    if (first[e] < 0) { first[e] = g; continue; }
    const int a = find(g), b = find(first[e]);
    if (a != b) parent[a] = b, --n;
  }
  return n;
}

double balancedness(std::span<const double> l) {
  double mx = 0, s = 0;
  for (double x : l) mx = std::max(mx, x), s += x;
  if (mx <= 0) return 1.0;
  return s / double(l.size()) / mx;
}

double imbalance(std::span<const double> l) {
  double mx = 0, s = 0;
  for (double x : l) mx = std::max(mx, x), s += x;
  if (s <= 0) return 0.0;
  return mx / (s / double(l.size())) - 1.0;
}

std::vector<int32_t> optimal_replica_counts(const double* w, int E, int P, int cap) {
  check(P >= E, "replica counts: {} physical slots are fewer than {} logical experts", P, E);
  check(int64_t(cap) * E >= P, "replica counts: {} slots cannot be filled with at most {} replicas of {} experts", P,
        cap, E);
  std::vector<int32_t> c(E, 1);
  if (cap <= 1 || P == E) return c;
  // Max-heap on w/c, ties to the lower index.
  std::vector<std::pair<double, int>> heap(E);
  for (int e = 0; e < E; ++e) heap[e] = {w[e], -e};
  std::make_heap(heap.begin(), heap.end());
  for (int i = E; i < P; ++i) {
    std::pop_heap(heap.begin(), heap.end());
    int e = -heap.back().second;
    c[e]++;
    if (c[e] < cap) heap.back() = {w[e] / c[e], -e};
    else heap.pop_back();
    if (!heap.empty() && c[e] < cap) std::push_heap(heap.begin(), heap.end());
  }
  return c;
}

double max_load_lower_bound(const double* w, int E, int P, int G) {
  double s = 0;
  for (int e = 0; e < E; ++e) s += w[e];
  auto c = optimal_replica_counts(w, E, P, P);
  double m = 0;
  for (int e = 0; e < E; ++e) m = std::max(m, w[e] / c[e]);
  return std::max(s / G, m);
}

LayerBalance evaluate_even(const Placement& pl, const LoadTrace& load, int pass) {
  check(load.layers == pl.layers && load.experts == pl.logical,
        "evaluate: load is [{}][{}] but the placement is for {} layers x {} experts", load.layers, load.experts,
        pl.layers, pl.logical);
  LayerBalance b;
  double sum_b = 0, sum_i = 0, sum_r = 0;
  for (int l = 0; l < pl.layers; ++l) {
    const double* w = load.at(pass, l);
    auto rl = rank_loads_even(pl.layer(l), pl.ranks, w, pl.logical);
    double bal = balancedness(rl);
    double mx = *std::max_element(rl.begin(), rl.end());
    double lb = max_load_lower_bound(w, pl.logical, pl.physical, pl.ranks);
    b.balancedness.push_back(bal);
    b.max_load.push_back(mx);
    b.bound.push_back(lb);
    sum_b += bal, sum_i += imbalance(rl), sum_r += lb > 0 ? mx / lb : 1.0;
    if (bal < b.worst) b.worst = bal, b.worst_layer = l;
  }
  int L = std::max(1, pl.layers);
  b.mean = sum_b / L, b.mean_imbalance = sum_i / L, b.achieved_over_bound = sum_r / L;
  return b;
}

MeasuredBalance measured_balance(const double* tokens, int L, int G) {
  check(L > 0 && G > 0, "measured_balance: empty counts ({} layers x {} ranks)", L, G);
  MeasuredBalance m;
  m.per_layer.resize(L);
  double sum = 0;
  for (int l = 0; l < L; ++l) {
    std::span<const double> row(tokens + size_t(l) * G, size_t(G));
    for (double x : row) check(std::isfinite(x) && x >= 0, "measured_balance: layer {} has a count {} (counts must be finite and >= 0)", l, x);
    double mean = 0, mx = 0;
    for (double x : row) mean += x / G, mx = std::max(mx, x);
    m.avg_tokens += mean, m.max_tokens += mx;
    sum += (m.per_layer[l] = balancedness(row));
  }
  m.balancedness = m.max_tokens > 0 ? m.avg_tokens / m.max_tokens : 0.0;
  m.mean = sum / L;
  return m;
}

}  // namespace ballast::eplb
