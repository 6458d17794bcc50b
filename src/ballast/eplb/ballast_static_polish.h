#pragma once
// Step 7 of the `ballast` planner (ballast_algorithm.h), internal to eplb/: a packing polished for
// static dispatch's exact shares (dispatch.h) of the aggregate loads or of the loads expected next.
#include <cstdint>
#include <vector>

#include "ballast/eplb/ballast_packing.h"

namespace ballast::eplb::ballast_detail {

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

// Swaps that take the most loaded rank under static dispatch of the loads `w` [E] (the aggregate,
// or the loads expected next) below the maximum (first found, partners from the lightest),
// keeping the aggregate's even-split maximum at most `even_cap`. Returns the number of swaps
// applied. keep_moves (with a current placement): only swaps that move no more experts away from it.
int static_polish(const Problem& pr, Packing& pk, const double* w, double even_cap, int max_iter, int64_t budget,
                  PolishScratch& scratch, bool keep_moves = false);

}  // namespace ballast::eplb::ballast_detail
