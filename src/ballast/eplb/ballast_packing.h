#pragma once
// The packing machinery of the `ballast` planner (ballast_algorithm.h's steps 2-5), internal to
// eplb/: one layer's problem, a packing of its replicas into rank slots with the loads it gives,
// LPT packing, swap-based local search, the joint search over replica counts, and relabelling to
// a current placement. ballast_algorithm.cpp plans a layer with them; ballast_static_polish.cpp
// polishes a packing for static dispatch.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ballast::eplb::ballast_detail {

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

// The load of one replica of e in slice s (an even split of e's load over its replicas).
inline double item(const Problem& pr, const Packing& pk, int e, int s) {
  return pr.w[size_t(e) * pr.S + s] / pk.cnt[e];
}

// Rank loads, F, Q, moved (and `has` unless the caller already built it) from slot and cnt.
void recompute(const Problem& pr, Packing& pk, bool has_ready = false);
// Whether x scores lower than y (ties: lower Q).
bool better(const Problem& pr, const Packing& x, const Packing& y);
// Swap-based local search on score = F + lambda * moved, secondary Q. pr.linked: only swaps of
// experts with one replica each (they leave the replica graph of metrics.h unchanged).
void local_search(const Problem& pr, Packing& pk);
// LPT packing of the counts, then local search.
Packing pack_and_search(const Problem& pr, const std::vector<int32_t>& cnt);
// Joint choice of counts and packing: a short tabu walk over single replica moves (e+1, f-1).
Packing search_counts(const Problem& pr, Packing best, int rounds);
// Relabel the ranks of a packing to overlap the current placement most (greedy on overlap),
// then put each expert that stays into its current slot index.
std::vector<int32_t> relabel(const Problem& pr, const Packing& pk, const int32_t* cur_row);
// The packing a row of slots (a current placement, deepseek's) is, scored.
Packing from_row(const Problem& pr, const int32_t* row);
// The experts of slot i of rank a and slot j of rank b exchanged, loads updated in place.
void swap_slots(const Problem& pr, Packing& pk, int a, int i, int b, int j);
// The same problem on the window's aggregate only (S = 1): what the count search and the
// candidate packings are scored on; the time slices enter in the final local searches.
Problem aggregate_problem(const Problem& pr);
// pk's slots and counts scored on pr (another problem over the same experts: its slices).
Packing rescore(const Problem& pr, const Packing& pk);
// deepseek's placement of the aggregate (deepseek.h, as the original: float weights), slot [G][K].
std::vector<int32_t> deepseek_slots(const Problem& pr);

}  // namespace ballast::eplb::ballast_detail
