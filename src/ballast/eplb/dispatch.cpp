#include "ballast/eplb/dispatch.h"

#include "ballast/core/error.h"
#include "ballast/eplb/limits.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

namespace ballast::eplb {

namespace {
// Up to this many tokens of an expert, the random policy hashes each token (as the engine does).
constexpr int64_t kPerTokenDraws = 1 << 16;
}  // namespace

Dispatch parse_dispatch(const std::string& name) {
  if (name == "static") return Dispatch::static_;
  if (name == "random" || name == "dynamic") return Dispatch::random;
  if (name == "balanced") return Dispatch::balanced;
  fail("unknown dispatch policy '{}' (expected static, random or balanced)", name);
}

std::string dispatch_name(Dispatch d) {
  switch (d) {
    case Dispatch::static_: return "static";
    case Dispatch::random: return "random";
    case Dispatch::balanced: return "balanced";
  }
  return "?";
}

std::vector<std::vector<int32_t>> replicas_of(std::span<const int32_t> row, int experts) {
  std::vector<std::vector<int32_t>> rep(experts);
  for (int p = 0; p < int(row.size()); ++p) {
    check(row[p] >= 0 && row[p] < experts, "dispatch: slot {} holds expert {}, outside [0, {})", p, row[p], experts);
    rep[row[p]].push_back(p);
  }
  for (int e = 0; e < experts; ++e) check(!rep[e].empty(), "dispatch: expert {} has no replica", e);
  return rep;
}

std::vector<int32_t> static_table(std::span<const int32_t> row, int G, int ranks_per_node, int E) {
  const int P = int(row.size());
  check(G > 0 && P % G == 0, "dispatch: {} slots are not divisible by {} ranks", P, G);
  const int K = P / G, rpn = ranks_per_node > 0 ? ranks_per_node : G;
  auto rep = replicas_of(row, E);
  std::vector<int32_t> table(size_t(G) * E);
  std::vector<int32_t> cand, served(P, 0);
  for (int e = 0; e < E; ++e) {
    // Every replica serves its own rank; the other source ranks are shared out fairly (as
    // SGLang's `_fair_choices`: every candidate replica serves the same number of source ranks,
    // +-1), deterministically: a source takes the candidate that serves fewest so far (ties:
    // lower slot). Candidates: the replicas on the source's node, else all replicas.
    for (int32_t p : rep[e]) served[p] = 1;
    for (int s = 0; s < G; ++s) {
      int32_t pick = -1;
      for (int32_t p : rep[e])
        if (p / K == s) { pick = p; break; }
      if (pick < 0) {
        cand.clear();
        for (int32_t p : rep[e])
          if (p / K / rpn == s / rpn) cand.push_back(p);
        const auto& from = cand.empty() ? rep[e] : cand;
        for (int32_t p : from)
          if (pick < 0 || served[p] < served[pick]) pick = p;
        served[pick]++;
      }
      table[size_t(s) * E + e] = pick;
    }
  }
  return table;
}

std::vector<double> dispatch_static(std::span<const int32_t> row, int G, int ranks_per_node, const double* counts,
                                    int E) {
  auto table = static_table(row, G, ranks_per_node, E);
  std::vector<double> slot(row.size(), 0.0);
  for (int s = 0; s < G; ++s)
    for (int e = 0; e < E; ++e) slot[table[size_t(s) * E + e]] += counts[e] / G;
  return slot;
}

std::vector<double> dispatch_random(std::span<const int32_t> row, const double* counts, int E, uint64_t seed) {
  auto rep = replicas_of(row, E);
  std::vector<double> slot(row.size(), 0.0);
  for (int e = 0; e < E; ++e) {
    check(counts[e] >= 0 && counts[e] <= kMaxCount && counts[e] == std::floor(counts[e]),
          "dispatch: count {} of expert {} is not a whole number in [0, 2^53]", counts[e], e);
    const int64_t n = int64_t(counts[e]);
    if (rep[e].size() == 1) { slot[rep[e][0]] += double(n); continue; }
    uint64_t base = mix64(seed ^ mix64(uint64_t(e)));
    if (n <= kPerTokenDraws) {
      for (int64_t t = 0; t < n; ++t) slot[rep[e][mix64(base + uint64_t(t)) % rep[e].size()]] += 1.0;
      continue;
    }
    // Many tokens (a replayed trace's counts): the same uniform choice as a multinomial split by
    // conditional binomials, in time independent of n.
    std::mt19937_64 rng(base);
    int64_t left = n;
    for (size_t i = 0; i < rep[e].size(); ++i) {
      const size_t k = rep[e].size() - i;
      const int64_t x = k == 1 ? left : std::binomial_distribution<int64_t>(left, 1.0 / double(k))(rng);
      slot[rep[e][i]] += double(x), left -= x;
    }
  }
  return slot;
}

namespace {

// Dinic max-flow on a small graph (int64 capacities).
struct MaxFlow {
  struct Edge { int to; int64_t cap; };
  std::vector<Edge> edges;
  std::vector<std::vector<int>> adj;
  std::vector<int> level, it;
  explicit MaxFlow(int n) : adj(n), level(n), it(n) {}
  int add(int u, int v, int64_t c) {
    edges.push_back({v, c}), adj[u].push_back(int(edges.size()) - 1);
    edges.push_back({u, 0}), adj[v].push_back(int(edges.size()) - 1);
    return int(edges.size()) - 2;
  }
  bool bfs(int s, int t) {
    std::fill(level.begin(), level.end(), -1);
    std::vector<int> q{s};
    level[s] = 0;
    for (size_t i = 0; i < q.size(); ++i)
      for (int id : adj[q[i]])
        if (edges[id].cap > 0 && level[edges[id].to] < 0) level[edges[id].to] = level[q[i]] + 1, q.push_back(edges[id].to);
    return level[t] >= 0;
  }
  int64_t dfs(int u, int t, int64_t f) {
    if (u == t) return f;
    for (int& i = it[u]; i < int(adj[u].size()); ++i) {
      Edge& e = edges[adj[u][i]];
      if (e.cap > 0 && level[e.to] == level[u] + 1) {
        int64_t d = dfs(e.to, t, std::min(f, e.cap));
        if (d > 0) {
          e.cap -= d, edges[adj[u][i] ^ 1].cap += d;
          return d;
        }
      }
    }
    return 0;
  }
  int64_t run(int s, int t) {
    int64_t total = 0;
    while (bfs(s, t)) {
      std::fill(it.begin(), it.end(), 0);
      while (int64_t f = dfs(s, t, std::numeric_limits<int64_t>::max())) total += f;
    }
    return total;
  }
};

struct Flexible {
  int expert;
  int64_t n;
  std::vector<int> ranks;                 // distinct ranks holding the expert
  std::vector<std::vector<int32_t>> slots;  // slots per rank
};

// Splits n tokens over k slots as evenly as possible (remainder to the first).
void split_even(std::vector<double>& slot, const std::vector<int32_t>& slots, int64_t n) {
  int64_t k = int64_t(slots.size()), q = n / k, r = n % k;
  for (int64_t i = 0; i < k; ++i) slot[slots[i]] += double(q + (i < r ? 1 : 0));
}

}  // namespace

std::vector<double> dispatch_balanced(std::span<const int32_t> row, int G, const double* counts, int E) {
  const int P = int(row.size());
  check(G > 0 && P % G == 0, "dispatch: {} slots are not divisible by {} ranks", P, G);
  const int K = P / G;
  auto rep = replicas_of(row, E);
  std::vector<double> slot(P, 0.0);
  std::vector<int64_t> base(G, 0);
  std::vector<Flexible> flex;
  int64_t total = 0;
  for (int e = 0; e < E; ++e) {
    check(counts[e] >= 0 && counts[e] <= kMaxCount && counts[e] == std::floor(counts[e]),
          "dispatch: count {} of expert {} is not a whole number in [0, 2^53]", counts[e], e);
    const int64_t n = int64_t(counts[e]);
    total += n;  // no overflow: each n and the running total stay <= 2^53
    check(total <= int64_t(kMaxCount), "dispatch: the pass's counts sum to more than 2^53");
    Flexible f{e, n, {}, {}};
    for (int32_t p : rep[e]) {
      int r = p / K;
      if (f.ranks.empty() || f.ranks.back() != r) f.ranks.push_back(r), f.slots.emplace_back();
      f.slots.back().push_back(p);
    }
    if (f.ranks.size() == 1 || n == 0) {
      for (size_t i = 0; i < f.ranks.size(); ++i) {
        // n == 0 or a single rank: all of it on the first rank.
        if (i == 0) split_even(slot, f.slots[0], n), base[f.ranks[0]] += n;
      }
    } else {
      flex.push_back(std::move(f));
    }
  }
  if (flex.empty()) return slot;
  // Lower bound and a feasible (greedy water-filling) upper bound on the max rank load.
  int64_t lo = std::max(*std::max_element(base.begin(), base.end()), (total + G - 1) / G);
  std::vector<int64_t> g_load = base;
  std::vector<int> order(flex.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return flex[a].n > flex[b].n; });
  for (int i : order) {
    auto& f = flex[i];
    std::vector<int> rs = f.ranks;
    std::sort(rs.begin(), rs.end(), [&](int a, int b) { return g_load[a] != g_load[b] ? g_load[a] < g_load[b] : a < b; });
    int64_t rem = f.n;
    // Raise the lowest ranks to a common level.
    size_t k = 1;
    while (rem > 0) {
      int64_t next = k < rs.size() ? g_load[rs[k]] : std::numeric_limits<int64_t>::max();
      int64_t need = k < rs.size() ? (next - g_load[rs[0]]) * int64_t(k) : rem + 1;
      if (need <= rem && k < rs.size()) {
        for (size_t j = 0; j < k; ++j) rem -= next - g_load[rs[j]], g_load[rs[j]] = next;
        ++k;
      } else {
        int64_t q = rem / int64_t(k), r = rem % int64_t(k);
        for (size_t j = 0; j < k; ++j) g_load[rs[j]] += q + (int64_t(j) < r ? 1 : 0);
        rem = 0;
      }
    }
  }
  int64_t hi = *std::max_element(g_load.begin(), g_load.end());
  // Feasibility of max load T by max-flow: source -> expert (n) -> rank (inf) -> sink (T - base).
  const int F = int(flex.size());
  auto feasible = [&](int64_t T, std::vector<std::vector<int64_t>>* split) {
    MaxFlow mf(2 + F + G);
    const int src = 0, sink = 1 + F + G;
    int64_t need = 0;
    std::vector<std::vector<int>> ids(F);
    for (int i = 0; i < F; ++i) {
      mf.add(src, 1 + i, flex[i].n), need += flex[i].n;
      for (int r : flex[i].ranks) ids[i].push_back(mf.add(1 + i, 1 + F + r, flex[i].n));
    }
    for (int r = 0; r < G; ++r)
      if (T > base[r]) mf.add(1 + F + r, sink, T - base[r]);
    bool ok = mf.run(src, sink) == need;
    if (ok && split) {
      split->assign(F, {});
      for (int i = 0; i < F; ++i)
        for (int id : ids[i]) (*split)[i].push_back(mf.edges[id ^ 1].cap);
    }
    return ok;
  };
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (feasible(mid, nullptr)) hi = mid; else lo = mid + 1;
  }
  std::vector<std::vector<int64_t>> split;
  bool ok = feasible(hi, &split);
  check(ok, "dispatch: internal error, balanced split infeasible at its own upper bound");
  for (int i = 0; i < F; ++i)
    for (size_t j = 0; j < flex[i].ranks.size(); ++j) split_even(slot, flex[i].slots[j], split[i][j]);
  return slot;
}

std::vector<double> dispatch(Dispatch policy, std::span<const int32_t> row, int ranks, int ranks_per_node,
                             const double* counts, int experts, uint64_t seed) {
  switch (policy) {
    case Dispatch::static_: return dispatch_static(row, ranks, ranks_per_node, counts, experts);
    case Dispatch::random: return dispatch_random(row, counts, experts, seed);
    case Dispatch::balanced: return dispatch_balanced(row, ranks, counts, experts);
  }
  return {};
}

}  // namespace ballast::eplb
