#include "ballast/eplb/ballast_static_polish.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace ballast::eplb::ballast_detail {
namespace {

// With holders h of e, rank `from` replaced by rank `to` (kept ascending).
void move_holder(std::vector<int>& h, int from, int to) {
  auto it = std::find(h.begin(), h.end(), from);
  h.erase(it);
  h.insert(std::lower_bound(h.begin(), h.end(), to), to);
}

}  // namespace

int static_polish(const Problem& pr, Packing& pk, const double* w, double even_cap, int max_iter, int64_t budget,
                  PolishScratch& scratch, bool keep_moves) {
  const int G = pr.G, K = pr.K, E = pr.E;
  for (int p = 0; p < pr.P; ++p)  // duplicates on a rank (from a current placement): the model does not hold
    if (pk.has[size_t(p / K) * E + pk.slot[p]] > 1) return 0;
  StaticLoads& st = scratch.st;
  st.G = G, st.w = w;
  st.L.assign(G, 0.0);
  if (int(st.where.size()) < E) st.where.resize(E);
  for (int e = 0; e < E; ++e) st.where[e].clear();
  for (int g = 0; g < G; ++g)
    for (int k = 0; k < K; ++k) st.where[pk.slot[g * K + k]].push_back(g);
  for (int e = 0; e < E; ++e) st.add(e, st.where[e], 1.0, st.L);
  keep_moves &= pr.has_current;
  auto away = [&](int g, int e) { return pr.cur_has[size_t(g) * E + e] ? 0 : 1; };
  auto &order = scratch.order, &touched = scratch.touched, &hx = scratch.hx, &hy = scratch.hy;
  auto &nl = scratch.nl, &sc = scratch.sc, &lo = scratch.lo, &hi = scratch.hi;
  auto& mark = scratch.mark;
  order.resize(G), touched.clear(), nl.resize(G), mark.assign(G, 0);
  // Each slot's static load (its expert's share on that rank) and per rank the least and most.
  sc.resize(size_t(G) * K), lo.resize(G), hi.resize(G);
  auto slot_loads = [&](int e) {
    const auto& h = st.where[e];
    const int c = int(h.size());
    for (int q = 0; q < c; ++q) {
      const int g = h[q];
      int k = 0;
      while (pk.slot[g * K + k] != e) ++k;
      sc[g * K + k] = w[e] * StaticLoads::share(G, c, q);
    }
  };
  auto rank_range = [&](int g) {
    lo[g] = *std::min_element(&sc[g * K], &sc[g * K] + K);
    hi[g] = *std::max_element(&sc[g * K], &sc[g * K] + K);
  };
  for (int e = 0; e < E; ++e) slot_loads(e);
  for (int g = 0; g < G; ++g) rank_range(g);
  int applied = 0;
  const int near = std::min(G - 1, 8);
  for (int iter = 0; iter < max_iter; ++iter) {
    // a: the most loaded rank; partners: the `near` lightest first, the others only when those
    // give nothing.
    std::iota(order.begin(), order.end(), 0);
    auto lighter = [&](int u, int v) { return st.L[u] != st.L[v] ? st.L[u] < st.L[v] : u < v; };
    const int a = *std::max_element(order.begin(), order.end(), lighter);
    std::partial_sort(order.begin(), order.begin() + near, order.end(), lighter);
    const double lmax = st.L[a], eps = 1e-12 * (lmax + 1.0);
    int bi = -1, bb = -1, bj = -1;
    for (int pass = 0; pass < 2 && bi < 0; ++pass)
    for (int i = 0; i < K; ++i) {
      const int x = pk.slot[a * K + i];
      const double ax = pr.agg[x] / pk.cnt[x], cx = sc[a * K + i];
      for (int bk = pass == 0 ? 0 : near; bk < (pass == 0 ? near : G); ++bk) {
        const int b = order[bk];
        if (b == a) continue;
        // Whole rank b: some slot must carry less than x (lo) and b must stay below (hi).
        if (lo[b] >= cx || st.L[b] + cx - hi[b] >= lmax - eps) continue;
        if (pk.has[size_t(b) * E + x]) continue;
        if ((budget -= K) < 0) goto found;  // bounds the time: the walk ends with what it has
        for (int j = 0; j < K; ++j) {
          // Pre-filter on the current shares (exact when neither expert's holder order changes):
          // a must shed load and b must stay below a's current load.
          const double cy = sc[b * K + j];
          if (cy >= cx || st.L[b] + cx - cy >= lmax - eps) continue;
          const int y = pk.slot[b * K + j];
          if (pk.has[size_t(a) * E + y]) continue;
          if (keep_moves && away(b, x) + away(a, y) > away(a, x) + away(b, y)) continue;
          const double ay = pr.agg[y] / pk.cnt[y];
          if (std::max(pk.A[a] - ax + ay, pk.A[b] - ay + ax) > even_cap) continue;
          if (pk.cnt[x] == 1 && pk.cnt[y] == 1) { bi = i, bb = b, bj = j; goto found; }  // exact
          // New static loads of the ranks holding x or y (before or after the swap): the swap is
          // taken when all of them end below the maximum (then a leaves the maximum, and the
          // maximum or the number of ranks at it falls: the walk ends).
          touched.clear();
          auto touch = [&](int g) { if (!mark[g]) mark[g] = 1, nl[g] = st.L[g], touched.push_back(g); };
          for (int g : st.where[x]) touch(g);
          for (int g : st.where[y]) touch(g);
          touch(b);
          hx = st.where[x], hy = st.where[y];
          st.add(x, hx, -1.0, nl), st.add(y, hy, -1.0, nl);
          move_holder(hx, a, b), move_holder(hy, b, a);
          st.add(x, hx, 1.0, nl), st.add(y, hy, 1.0, nl);
          double mt = 0;
          for (int g : touched) mt = std::max(mt, nl[g]), mark[g] = 0;
          if (mt >= lmax - eps) continue;
          bi = i, bb = b, bj = j;
          goto found;
        }
      }
    }
  found:
    if (bi < 0) break;
    {
      const int x = pk.slot[a * K + bi], y = pk.slot[bb * K + bj];
      st.add(x, st.where[x], -1.0, st.L), st.add(y, st.where[y], -1.0, st.L);
      move_holder(st.where[x], a, bb), move_holder(st.where[y], bb, a);
      st.add(x, st.where[x], 1.0, st.L), st.add(y, st.where[y], 1.0, st.L);
      swap_slots(pr, pk, a, bi, bb, bj);
      slot_loads(x), slot_loads(y);
      for (int g : st.where[x]) rank_range(g);
      for (int g : st.where[y]) rank_range(g);
      ++applied;
    }
  }
  if (applied > 0) recompute(pr, pk);  // (with none the caller keeps its own packing)
  return applied;
}

}  // namespace ballast::eplb::ballast_detail
