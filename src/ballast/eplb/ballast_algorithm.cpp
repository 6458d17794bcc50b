#include "ballast/eplb/ballast_algorithm.h"

#include "ballast/core/error.h"
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/metrics.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

namespace ballast::eplb {
namespace {

// One layer's problem: loads w [E][S], aggregates, the bound, and the current placement if any.
struct Problem {
  int S, E, P, G, K;
  std::vector<double> w;    // [E][S]
  std::vector<double> agg;  // [E]
  double bound = 0;         // sum over slices of the per-slice lower bound
  double lambda = 0;        // migration weight, in score units per moved pair
  std::vector<uint8_t> cur_has;  // [G][E] replicas of e on rank g in the current placement
  bool has_current = false;
  // Planned for balanced dispatch: packings link all ranks through shared experts (pack_lpt) and
  // the searches keep that replica graph (only swaps of unreplicated experts).
  bool linked = false;
};

// A packing: slot [G][K] -> expert, with rank loads per slice.
struct Packing {
  std::vector<int32_t> slot;  // [G*K]
  std::vector<int32_t> cnt;   // [E]
  std::vector<double> load;   // [G][S]
  std::vector<double> A;      // [G] aggregate load
  std::vector<uint8_t> has;   // [G][E]
  int moved = 0;
  double F = 0, Q = 0;
  double score(const Problem& pr) const { return F + pr.lambda * moved; }
};

double item(const Problem& pr, const Packing& pk, int e, int s) { return pr.w[size_t(e) * pr.S + s] / pk.cnt[e]; }

// Rank loads, F, Q, moved (and `has` unless the caller already built it) from slot and cnt.
void recompute(const Problem& pr, Packing& pk, bool has_ready = false) {
  const int S = pr.S, G = pr.G, K = pr.K;
  pk.load.assign(size_t(G) * S, 0.0);
  pk.A.assign(G, 0.0);
  if (!has_ready) pk.has.assign(size_t(G) * pr.E, 0);
  pk.moved = 0;
  for (int g = 0; g < G; ++g)
    for (int k = 0; k < K; ++k) {
      int e = pk.slot[g * K + k];
      for (int s = 0; s < S; ++s) pk.load[size_t(g) * S + s] += item(pr, pk, e, s);
      pk.A[g] += pr.agg[e] / pk.cnt[e];
      if (!has_ready) pk.has[size_t(g) * pr.E + e]++;
      if (pr.has_current && !pr.cur_has[size_t(g) * pr.E + e]) pk.moved++;
    }
  pk.F = 0, pk.Q = 0;
  for (int s = 0; s < S; ++s) {
    double m = 0;
    for (int g = 0; g < G; ++g) m = std::max(m, pk.load[size_t(g) * S + s]);
    pk.F += m;
  }
  for (int g = 0; g < G; ++g) pk.Q += pk.A[g] * pk.A[g];
}

// Heaviest replica first into the lightest rank with room that lacks the expert. pr.linked: a
// further replica of an expert goes to the lightest such rank OUTSIDE the replica-graph component
// of its expert's first holder when there is one, so that every redundant slot joins two
// components and R >= G - 1 redundant slots link all ranks (a spanning tree of shared experts).
// The order LPT visits experts in: per-replica load descending, lower expert on ties.
using LptKey = std::pair<double, int>;  // (-agg / cnt, e)
std::vector<LptKey> lpt_order(const Problem& pr, const std::vector<int32_t>& cnt) {
  std::vector<LptKey> key(pr.E);
  for (int e = 0; e < pr.E; ++e) key[e] = {-pr.agg[e] / cnt[e], e};
  std::sort(key.begin(), key.end());
  return key;
}

// The same order after the counts of experts e and f changed (cnt holds the new counts): the two
// keys are taken out and put back in place, O(E) instead of a sort.
std::vector<LptKey> lpt_order_after(const Problem& pr, std::vector<LptKey> key, const std::vector<int32_t>& cnt,
                                     int e, int f) {
  std::erase_if(key, [&](const LptKey& k) { return k.second == e || k.second == f; });
  for (int x : {e, f}) {
    const LptKey k{-pr.agg[x] / cnt[x], x};
    key.insert(std::lower_bound(key.begin(), key.end(), k), k);
  }
  return key;
}

Packing pack_lpt(const Problem& pr, const std::vector<int32_t>& cnt, const std::vector<LptKey>& key) {
  const bool connect = pr.linked;
  const int G = pr.G, K = pr.K, E = pr.E;
  Packing pk;
  pk.cnt = cnt;
  // Each expert repeated c_e times, in LPT order.
  std::vector<int32_t> items;
  items.reserve(pr.P);
  for (auto [k, e] : key)
    for (int c = 0; c < cnt[e]; ++c) items.push_back(e);
  std::vector<int32_t> fill(G, 0);
  std::vector<double> A(G, 0.0);
  std::vector<uint8_t>& has = pk.has;
  has.assign(size_t(G) * E, 0);
  pk.slot.assign(size_t(G) * K, -1);
  // The lightest rank with room that lacks e (lower rank on ties): a min-heap of (load, rank)
  // over ranks with room; ranks popped because they hold e go back after the choice.
  using LR = std::pair<double, int>;
  std::vector<LR> heap, skipped;
  heap.reserve(G);
  for (int g = 0; g < G; ++g) heap.push_back({0.0, g});
  auto gt = std::greater<LR>();
  std::make_heap(heap.begin(), heap.end(), gt);
  // Union-find over ranks (connect only) and the first holder of each expert.
  std::vector<int> parent(connect ? G : 0), first(connect ? E : 0, -1);
  std::iota(parent.begin(), parent.end(), 0);
  auto find = [&](int x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  };
  int components = G;
  for (int e : items) {
    int best = -1;
    skipped.clear();
    // (once every rank is linked there is no component to avoid)
    const int avoid = connect && components > 1 && first[e] >= 0 ? find(first[e]) : -1;
    size_t fallback = SIZE_MAX;  // the lightest rank lacking e, inside the component
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), gt);
      LR top = heap.back();
      heap.pop_back();
      if (!has[size_t(top.second) * E + e]) {
        if (avoid < 0 || find(top.second) != avoid) { best = top.second; break; }
        if (fallback == SIZE_MAX) fallback = skipped.size();
      }
      skipped.push_back(top);
    }
    if (best < 0 && fallback != SIZE_MAX) {
      best = skipped[fallback].second;
      skipped.erase(skipped.begin() + fallback);
    }
    for (const LR& x : skipped) heap.push_back(x), std::push_heap(heap.begin(), heap.end(), gt);
    if (connect && best >= 0) {
      if (first[e] < 0) {
        first[e] = best;
      } else if (const int a = find(best), b = find(first[e]); a != b) {
        parent[a] = b, --components;
      }
    }
    if (best < 0) {
      // (rare) the repair below changes loads: the heap is rebuilt after it.
      auto rebuild = [&] {
        heap.clear();
        for (int g = 0; g < G; ++g)
          if (fill[g] < K) heap.push_back({A[g], g});
        std::make_heap(heap.begin(), heap.end(), gt);
      };
      // Every rank with room already holds e: move an item x from a full rank a (without e)
      // to a rank b with room (without x's expert), and put e where x was.
      int b = -1;
      for (int g = 0; g < G; ++g)
        if (fill[g] < K && (b < 0 || A[g] < A[b])) b = g;
      bool done = false;
      for (int a = 0; a < G && !done; ++a) {
        if (a == b || has[size_t(a) * E + e]) continue;
        for (int k = 0; k < fill[a] && !done; ++k) {
          int x = pk.slot[a * K + k];
          if (has[size_t(b) * E + x]) continue;
          double lx = pr.agg[x] / cnt[x], le = pr.agg[e] / cnt[e];
          pk.slot[b * K + fill[b]++] = x, has[size_t(b) * E + x]++, A[b] += lx;
          has[size_t(a) * E + x]--, A[a] -= lx;
          pk.slot[a * K + k] = e, has[size_t(a) * E + e]++, A[a] += le;
          done = true;
        }
      }
      if (!done) {  // cannot happen while every count is <= G; keep the slot filled regardless
        pk.slot[b * K + fill[b]++] = e, has[size_t(b) * E + e]++, A[b] += pr.agg[e] / cnt[e];
      }
      rebuild();
      continue;
    }
    pk.slot[best * K + fill[best]++] = e;
    has[size_t(best) * E + e]++;
    A[best] += pr.agg[e] / cnt[e];
    if (fill[best] < K) heap.push_back({A[best], best}), std::push_heap(heap.begin(), heap.end(), gt);
  }
  recompute(pr, pk, /*has_ready=*/true);
  return pk;
}

// Swap-based local search on score = F + lambda * moved, secondary Q. pr.linked: only swaps of
// experts with one replica each (they leave the replica graph of metrics.h unchanged).
void local_search(const Problem& pr, Packing& pk) {
  const bool keep_graph = pr.linked;
  const int S = pr.S, G = pr.G, K = pr.K, E = pr.E;
  const double eps = 1e-12 * (pk.F + 1.0);
  std::vector<double> top1(S), top2(S), top3(S);
  std::vector<int> arg1(S), arg2(S);
  std::vector<double> xi(S), xj(S);
  std::vector<int> crit, by_load;
  const int max_iter = 8 * G + 200;
  // Per-slot aggregate loads (agg / cnt), kept in step with the swaps: no division in the scan.
  std::vector<double> ia(size_t(G) * K);
  for (int p = 0; p < G * K; ++p) ia[p] = pr.agg[pk.slot[p]] / pk.cnt[pk.slot[p]];
  for (int iter = 0; iter < max_iter; ++iter) {
    for (int s = 0; s < S; ++s) {
      double v1 = -1, v2 = -1, v3 = -1;
      int a1 = -1, a2 = -1;
      for (int g = 0; g < G; ++g) {
        double v = pk.load[size_t(g) * S + s];
        if (v > v1) v3 = v2, v2 = v1, a2 = a1, v1 = v, a1 = g;
        else if (v > v2) v3 = v2, v2 = v, a2 = g;
        else if (v > v3) v3 = v;
      }
      top1[s] = v1, top2[s] = v2, top3[s] = v3, arg1[s] = a1, arg2[s] = a2;
    }
    crit.clear();
    for (int s = 0; s < S; ++s)
      if (std::find(crit.begin(), crit.end(), arg1[s]) == crit.end()) crit.push_back(arg1[s]);
    std::sort(crit.begin(), crit.end(), [&](int a, int b) { return pk.A[a] != pk.A[b] ? pk.A[a] > pk.A[b] : a < b; });
    if (pr.lambda > 0) {
      // Also ranks holding moved experts: swapping them home may pay for a little balance.
      for (int g = 0; g < G; ++g)
        if (std::find(crit.begin(), crit.end(), g) == crit.end()) crit.push_back(g);
    }
    // Stop at the bound (nothing left to win on balance).
    if (pr.lambda == 0) {
      double F = 0;
      for (int s = 0; s < S; ++s) F += top1[s];
      if (F <= pr.bound * (1 + 1e-3)) break;
    }
    // Partners: the lightest ranks first (a cheap pass), all ranks only when that finds nothing.
    by_load.resize(G);
    std::iota(by_load.begin(), by_load.end(), 0);
    // Second pass: all other ranks.
    const int near = std::min(G, 4), far = G;
    // Only the `near` lightest are ordered up front; the rest are sorted when the second pass is
    // reached (the same order as a full sort: the comparator is a strict total order).
    auto lighter = [&](int x, int y) { return pk.A[x] != pk.A[y] ? pk.A[x] < pk.A[y] : x < y; };
    std::partial_sort(by_load.begin(), by_load.begin() + near, by_load.end(), lighter);
    // With time slices the aggregate's max rank load (the in-sample balance) must not rise: the
    // slices only choose among moves that keep it.
    const double amax = pr.S > 1 ? *std::max_element(pk.A.begin(), pk.A.end()) * (1 + 1e-12) : INFINITY;
    bool applied = false;
    for (int pass = 0; pass < 2 && !applied; ++pass) {
    if (pass == 1) std::sort(by_load.begin() + near, by_load.end(), lighter);
    for (int a : crit) {
      double best_d = 0, best_q = 0;
      int bi = -1, bb = -1, bj = -1;
      bool is_crit = false;
      for (int s = 0; s < S; ++s) is_crit |= arg1[s] == a;
      for (int i = 0; i < K; ++i) {
        int ei = pk.slot[a * K + i];
        double ai = ia[a * K + i];
        bool i_moved = pr.has_current && !pr.cur_has[size_t(a) * E + ei];
        if (!is_crit && !i_moved) continue;
        if (keep_graph && pk.cnt[ei] > 1) continue;
        for (int s = 0; s < S; ++s) xi[s] = item(pr, pk, ei, s);
        for (int bk = pass == 0 ? 0 : near; bk < (pass == 0 ? near : far); ++bk) {
          int b = by_load[bk];
          if (b == a || pk.has[size_t(b) * E + ei]) continue;
          int dmove_i = 0;
          if (pr.has_current)
            dmove_i = int(!pr.cur_has[size_t(b) * E + ei]) - int(i_moved);
          for (int j = 0; j < K; ++j) {
            double aj = ia[b * K + j];
            // Without a current placement every swap must move load off a (checked first: cheap).
            if (!pr.has_current && (!is_crit || ai <= aj || pk.A[b] + ai - aj >= pk.A[a])) continue;
            int ej = pk.slot[b * K + j];
            if (ej == ei || pk.has[size_t(a) * E + ej]) continue;
            if (keep_graph && pk.cnt[ej] > 1) continue;
            int dmove = dmove_i;
            if (pr.has_current)
              dmove += int(!pr.cur_has[size_t(a) * E + ej]) - int(!pr.cur_has[size_t(b) * E + ej]);
            if (dmove >= 0) {
              // Balance must improve: load leaves a and b stays below a.
              if (!is_crit || ai <= aj || pk.A[b] + ai - aj >= pk.A[a]) continue;
            }
            double dF = 0;
            for (int s = 0; s < S; ++s) {
              double d = item(pr, pk, ej, s) - xi[s];
              double na = pk.load[size_t(a) * S + s] + d, nb = pk.load[size_t(b) * S + s] - d;
              double other = (arg1[s] != a && arg1[s] != b) ? top1[s]
                             : (arg2[s] != a && arg2[s] != b) ? top2[s] : top3[s];
              dF += std::max(other, std::max(na, nb)) - top1[s];
            }
            double d = dF + pr.lambda * dmove;
            double na = pk.A[a] - ai + aj, nb = pk.A[b] + ai - aj;
            if (std::max(na, nb) > amax) continue;
            double dq = na * na + nb * nb - pk.A[a] * pk.A[a] - pk.A[b] * pk.A[b];
            bool better = d < -eps || (d <= eps && dq < -eps * (pk.A[a] + 1.0));
            if (!better) continue;
            if (bi < 0 || d < best_d - eps || (d <= best_d + eps && dq < best_q))
              best_d = d, best_q = dq, bi = i, bb = b, bj = j;
          }
        }
      }
      if (bi >= 0) {
        int ei = pk.slot[a * K + bi], ej = pk.slot[bb * K + bj];
        double ai = pr.agg[ei] / pk.cnt[ei], aj = pr.agg[ej] / pk.cnt[ej];
        for (int s = 0; s < S; ++s) {
          double d = item(pr, pk, ej, s) - item(pr, pk, ei, s);
          pk.load[size_t(a) * S + s] += d, pk.load[size_t(bb) * S + s] -= d;
        }
        pk.A[a] += aj - ai, pk.A[bb] += ai - aj;
        pk.has[size_t(a) * E + ei]--, pk.has[size_t(bb) * E + ei]++;
        pk.has[size_t(bb) * E + ej]--, pk.has[size_t(a) * E + ej]++;
        pk.slot[a * K + bi] = ej, pk.slot[bb * K + bj] = ei;
        std::swap(ia[a * K + bi], ia[bb * K + bj]);
        if (pr.has_current) {
          pk.moved += int(!pr.cur_has[size_t(bb) * E + ei]) - int(!pr.cur_has[size_t(a) * E + ei]) +
                      int(!pr.cur_has[size_t(a) * E + ej]) - int(!pr.cur_has[size_t(bb) * E + ej]);
        }
        applied = true;
        break;
      }
    }
    }
    if (!applied) break;
  }
  double F = 0, Q = 0;
  for (int s = 0; s < S; ++s) {
    double m = 0;
    for (int g = 0; g < G; ++g) m = std::max(m, pk.load[size_t(g) * S + s]);
    F += m;
  }
  for (int g = 0; g < G; ++g) Q += pk.A[g] * pk.A[g];
  pk.F = F, pk.Q = Q;
}

bool better(const Problem& pr, const Packing& x, const Packing& y) {
  double sx = x.score(pr), sy = y.score(pr);
  double eps = 1e-12 * (std::abs(sy) + 1.0);
  if (sx < sy - eps) return true;
  if (sx > sy + eps) return false;
  return x.Q < y.Q - 1e-12 * (y.Q + 1.0);
}

Packing pack_and_search(const Problem& pr, const std::vector<int32_t>& cnt) {
  Packing pk = pack_lpt(pr, cnt, lpt_order(pr, cnt));
  local_search(pr, pk);
  return pk;
}

// Joint choice of counts and packing: a short tabu walk over single replica moves (e+1, f-1).
Packing search_counts(const Problem& pr, Packing best, int rounds) {
  const int E = pr.E, G = pr.G, K = pr.K;
  if (pr.P == E || rounds <= 0) return best;
  Packing cur = best;
  int tabu_e = -1, tabu_f = -1;
  const int m = E <= 32 ? E : 3;
  for (int r = 0; r < rounds; ++r) {
    if (best.F <= pr.bound * (1 + 1e-9)) break;
    // Candidate receivers: experts on the bottleneck rank(s) and the heaviest per-replica loads;
    // donors: the cheapest replicas to give up.
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::vector<int> recv, donors;
    int a = int(std::max_element(cur.A.begin(), cur.A.end()) - cur.A.begin());
    for (int k = 0; k < K; ++k) {
      int e = cur.slot[a * K + k];
      if (cur.cnt[e] < G && std::find(recv.begin(), recv.end(), e) == recv.end()) recv.push_back(e);
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int x, int y) { return pr.agg[x] / cur.cnt[x] > pr.agg[y] / cur.cnt[y]; });
    for (int i = 0, n = 0; i < E && n < m; ++i)
      if (cur.cnt[order[i]] < G && std::find(recv.begin(), recv.end(), order[i]) == recv.end())
        recv.push_back(order[i]), ++n;
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) {
      double lx = cur.cnt[x] > 1 ? pr.agg[x] / (cur.cnt[x] - 1) : INFINITY;
      double ly = cur.cnt[y] > 1 ? pr.agg[y] / (cur.cnt[y] - 1) : INFINITY;
      return lx < ly;
    });
    for (int i = 0; i < E && int(donors.size()) < m; ++i)
      if (cur.cnt[order[i]] > 1) donors.push_back(order[i]);
    if (recv.empty() || donors.empty()) break;
    // Every move is packed (cheap); only the `screened` best packings get the local search (most of
    // the cost: up to 36 moves a round on skewed layers).
    struct Move { Packing pk; int e, f; };
    std::vector<Move> top;
    const std::vector<LptKey> base = lpt_order(pr, cur.cnt);
    const size_t screened = 3;
    for (int e : recv)
      for (int f : donors) {
        if (e == f || (e == tabu_f && f == tabu_e)) continue;
        auto cnt = cur.cnt;
        cnt[e]++, cnt[f]--;
        Move mv{pack_lpt(pr, cnt, lpt_order_after(pr, base, cnt, e, f)), e, f};
        auto pos = std::find_if(top.begin(), top.end(), [&](const Move& t) { return better(pr, mv.pk, t.pk); });
        if (size_t(pos - top.begin()) < screened) top.insert(pos, std::move(mv));
        if (top.size() > screened) top.pop_back();
      }
    if (top.empty()) break;
    bool found = false;
    Packing step;
    int se = -1, sf = -1;
    for (Move& mv : top) {
      local_search(pr, mv.pk);
      if (!found || better(pr, mv.pk, step)) step = std::move(mv.pk), found = true, se = mv.e, sf = mv.f;
    }
    cur = std::move(step);
    tabu_e = se, tabu_f = sf;
    if (better(pr, cur, best)) best = cur;
  }
  return best;
}

// Relabel the ranks of a packing to overlap the current placement most (greedy on overlap),
// then put each expert that stays into its current slot index.
std::vector<int32_t> relabel(const Problem& pr, const Packing& pk, const int32_t* cur_row) {
  const int G = pr.G, K = pr.K, E = pr.E;
  std::vector<int32_t> ov(size_t(G) * G, 0);  // [new bin][current rank]
  for (int g = 0; g < G; ++g)
    for (int k = 0; k < K; ++k)
      for (int r = 0; r < G; ++r) ov[size_t(g) * G + r] += pr.cur_has[size_t(r) * E + pk.slot[g * K + k]] ? 1 : 0;
  std::vector<std::tuple<int, int, int>> pairs;
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < G; ++r)
      if (ov[size_t(g) * G + r] > 0) pairs.emplace_back(-ov[size_t(g) * G + r], g, r);
  std::sort(pairs.begin(), pairs.end());
  std::vector<int> to(G, -1), used(G, 0);
  for (auto [o, g, r] : pairs)
    if (to[g] < 0 && !used[r]) to[g] = r, used[r] = 1;
  for (int g = 0, r = 0; g < G; ++g)
    if (to[g] < 0) {
      while (used[r]) ++r;
      to[g] = r, used[r] = 1;
    }
  std::vector<int32_t> row(size_t(G) * K, -1);
  for (int g = 0; g < G; ++g) {
    int r = to[g];
    std::vector<int> rest;
    std::vector<uint8_t> taken(K, 0);
    for (int k = 0; k < K; ++k) {
      int e = pk.slot[g * K + k];
      int pos = -1;
      for (int q = 0; q < K; ++q)
        if (!taken[q] && cur_row[r * K + q] == e) { pos = q; break; }
      if (pos >= 0) row[r * K + pos] = e, taken[pos] = 1; else rest.push_back(e);
    }
    for (int q = 0, i = 0; q < K; ++q)
      if (!taken[q]) row[r * K + q] = rest[i++];
  }
  return row;
}

Packing from_row(const Problem& pr, const int32_t* row) {
  Packing pk;
  pk.slot.assign(row, row + pr.P);
  pk.cnt.assign(pr.E, 0);
  for (int p = 0; p < pr.P; ++p) pk.cnt[row[p]]++;
  recompute(pr, pk);
  return pk;
}


void swap_slots(const Problem& pr, Packing& pk, int a, int i, int b, int j) {
  const int K = pr.K, E = pr.E, S = pr.S;
  int ei = pk.slot[a * K + i], ej = pk.slot[b * K + j];
  for (int s = 0; s < S; ++s) {
    double d = item(pr, pk, ej, s) - item(pr, pk, ei, s);
    pk.load[size_t(a) * S + s] += d, pk.load[size_t(b) * S + s] -= d;
  }
  double ai = pr.agg[ei] / pk.cnt[ei], aj = pr.agg[ej] / pk.cnt[ej];
  pk.A[a] += aj - ai, pk.A[b] += ai - aj;
  pk.has[size_t(a) * E + ei]--, pk.has[size_t(b) * E + ei]++;
  pk.has[size_t(b) * E + ej]--, pk.has[size_t(a) * E + ej]++;
  pk.slot[a * K + i] = ej, pk.slot[b * K + j] = ei;
}

// The same problem on the window's aggregate only (S = 1): what the count search and the
// candidate packings are scored on; the time slices enter in the final local searches.
Problem aggregate_problem(const Problem& pr) {
  Problem a = pr;
  a.S = 1;
  a.w = pr.agg;
  a.bound = max_load_lower_bound(pr.agg.data(), pr.E, pr.P, pr.G);
  a.lambda = pr.bound > 0 ? pr.lambda * a.bound / pr.bound : pr.lambda;
  return a;
}

// Static dispatch (dispatch.h, one node): every replica of e serves its own rank and the source
// ranks without a replica are dealt out round robin over the replicas in rank order, so the
// replica of position i among c gets (1 + q + (i < r)) / G of e's tokens, q = (G - c) / c,
// r = (G - c) % c. Not the even split agg / c the packing assumes: with c not dividing G a hot
// expert's replicas differ by up to 1/G of its load each. StaticLoads keeps the rank loads under
// that rule, for the loads w [E] it is given (the aggregate, or the loads expected next), and
// evaluates a swap exactly from the holders of the two experts involved.
struct StaticLoads {
  int G;
  std::vector<double> L;                 // [G] rank loads under static dispatch (aggregate)
  std::vector<std::vector<int>> where;   // [E] ranks holding e, ascending
  const double* w = nullptr;             // [E] the loads dealt out
  static double share(int G, int c, int i) {
    const int m = G - c, q = m / c, r = m % c;
    return double(1 + q + (i < r)) / G;
  }
  void add(int e, const std::vector<int>& h, double sign, std::vector<double>& out) const {
    const int c = int(h.size());
    for (int i = 0; i < c; ++i) out[h[i]] += sign * w[e] * share(G, c, i);
  }
};

// What static_polish reuses from layer to layer, owned by the caller that plans the layers: the
// vectors keep their capacity (building `where` afresh cost one or two allocations per expert,
// most of the polish's fixed cost per layer).
struct PolishScratch {
  StaticLoads st;
  std::vector<int> order, touched, hx, hy;
  std::vector<double> nl, sc, lo, hi;
  std::vector<uint8_t> mark;
};

// With holders h of e, rank `from` replaced by rank `to` (kept ascending).
void move_holder(std::vector<int>& h, int from, int to) {
  auto it = std::find(h.begin(), h.end(), from);
  h.erase(it);
  h.insert(std::lower_bound(h.begin(), h.end(), to), to);
}

// Swaps that take the most loaded rank under static dispatch of the loads `w` [E] (the aggregate,
// or the loads expected next) below the maximum (first found, partners from the lightest),
// keeping the aggregate's even-split maximum at most `even_cap`. Returns the number of swaps
// applied. keep_moves (with a current placement): only swaps that move no more experts away from it.
int static_polish(const Problem& pr, Packing& pk, const double* w, double even_cap, int max_iter, int64_t budget,
                  PolishScratch& scratch, bool keep_moves = false) {
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

// deepseek's placement of the aggregate (deepseek.h, as the original: float weights), slot [G][K].
std::vector<int32_t> deepseek_slots(const Problem& pr) {
  const int E = pr.E, P = pr.P, G = pr.G;
  std::vector<float> wf(E);
  for (int e = 0; e < E; ++e) wf[e] = float(pr.agg[e]);
  std::vector<int32_t> p2l(P), rk(P), lc(E), pi(P), rip(P), slot(P);
  deepseek::replicate_experts(wf.data(), E, P, p2l.data(), rk.data(), lc.data());
  std::vector<float> pw(P);
  for (int q = 0; q < P; ++q) pw[q] = wf[p2l[q]] / float(lc[p2l[q]]);
  deepseek::balanced_packing(pw.data(), P, G, pi.data(), rip.data());
  for (int q = 0; q < P; ++q) slot[pi[q] * pr.K + rip[q]] = p2l[q];
  return slot;
}

Packing rescore(const Problem& pr, const Packing& pk) {
  Packing out;
  out.slot = pk.slot;
  out.cnt = pk.cnt;
  recompute(pr, out);
  return out;
}

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
