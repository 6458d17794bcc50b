#include "ballast/eplb/ballast_packing.h"

#include "ballast/core/error.h"
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/metrics.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

namespace ballast::eplb::ballast_detail {
namespace {

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

// Heaviest replica first into the lightest rank with room that lacks the expert. pr.linked: a
// further replica of an expert goes to the lightest such rank OUTSIDE the replica-graph component
// of its expert's first holder when there is one, so that every redundant slot joins two
// components and R >= G - 1 redundant slots link all ranks (a spanning tree of shared experts).
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

}  // namespace

void recompute(const Problem& pr, Packing& pk, bool has_ready) {
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

Problem aggregate_problem(const Problem& pr) {
  Problem a = pr;
  a.S = 1;
  a.w = pr.agg;
  a.bound = max_load_lower_bound(pr.agg.data(), pr.E, pr.P, pr.G);
  a.lambda = pr.bound > 0 ? pr.lambda * a.bound / pr.bound : pr.lambda;
  return a;
}
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

}  // namespace ballast::eplb::ballast_detail
