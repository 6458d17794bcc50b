#pragma once
// The `ballast` balancing algorithm (the default). Per layer:
//   1. replica counts: the counts that minimise the largest per-replica load (water-filling,
//      capped at G so that no rank holds two replicas of one expert);
//   2. packing: replicas heaviest first into the lightest rank that has a free slot and does not
//      hold the expert yet (ties: lower rank);
//   3. local search: swaps between a bottleneck rank and any other rank, scored on the sum over
//      time slices of the slice's max rank load (what per-pass step time follows), secondary the
//      sum of squared rank loads;
//   4. joint counts: while the packing is above the lower bound, moves of one replica from one
//      expert to another are tried, each re-packed and the best three local-searched (a short
//      tabu walk, best kept);
//   5. with a current placement: the new ranks are relabelled to overlap the current ones most,
//      slots keep their index where the expert stays, and a penalty `migration_weight` per moved
//      expert is added to the score, also starting a local search from the current placement;
//      the better of the two by score is kept;
//   6. for `balanced` dispatch (BallastOptions::dispatch): the packing of step 2 is redone with
//      the chosen counts so that every further replica of an expert goes to a rank outside the
//      component of its first holder in the replica graph (ranks linked by the experts they
//      share): R >= G - 1 redundant slots then link all ranks, and balanced dispatch can move any
//      pass's excess from one rank to any other. Steps 3 and 5 then keep that graph;
//   7. for `static` dispatch: swaps scored on the rank loads under static dispatch (exact shares),
//      of the slices' aggregate, or of the loads the placement is expected to serve when they are
//      given (BallastOptions::expected: the window's recent level where its load random-walks,
//      forecast.h): those are balanced while the aggregate's even-split maximum stays within
//      expected_slack of its bound and at most deepseek's plan's (so the window keeps a balance
//      at least deepseek's, and the next interval gets one planned for it); with a current
//      placement only swaps that move no more experts away from it.
//   8. with nodes > 1 (hierarchical, as deepseek's): expert groups are packed onto nodes first
//      (balanced packing of the groups' loads; with a current placement each pack goes to the node
//      whose slots hold most of its experts), then each node's experts are planned by steps 1-7 on
//      the node's slots and ranks, so replicas and migrations stay inside a node.
// Deterministic: the same inputs give the same placement on every rank.
#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/placement.h"

#include <cstdint>
#include <vector>

namespace ballast::eplb {

struct BallastOptions {
  int ranks = 0;      // G
  int physical = 0;   // P, P % G == 0, P >= E
  // Score = sum_s max_g load[s][g] / bound + migration_weight * moved_experts / P.
  // So migration_weight = 0.05 trades moving every slot of a layer for 5% of its balance.
  double migration_weight = 0.0;
  const Placement* current = nullptr;  // optional placement in force (same L, E, P, G)
  int count_rounds = -1;               // joint-count rounds per layer (-1: automatic by size)
  // The dispatch policy the placement will be served with (the engine's --ep-dispatch-algorithm):
  // `balanced` plans a connected replica graph (step 6), `static` and `random` the even split
  // polished for static shares (step 7).
  Dispatch dispatch = Dispatch::static_;
  // Step 7: swaps that lower the largest rank load under `static` dispatch (dispatch.h: each
  // replica serves its own rank plus a fair share of the other source ranks, so replicas of one
  // expert carry unequal shares when their count does not divide G), keeping the even-split
  // maximum within static_even_slack of its value.
  bool static_polish = true;
  double static_even_slack = 0.0;
  int static_budget = 8;   // swap trials (pre-filtered) per layer, in units of P: bounds the time
  // Step 7 on the loads expected next, for the layers flagged in expected_layers (empty: every
  // layer): expected is [1][L][E] (or nullptr: none). Static dispatch cannot adapt to a pass, so
  // its per-pass balance follows the next interval's mean loads; where popularity random-walks,
  // the window's latest level predicts them better than its average (docs/eplb.md, "Static
  // dispatch"). The aggregate's even-split maximum may rise to min(bound * (1 + expected_slack),
  // deepseek's maximum on it) (or stays at the plan's own when that is higher). With a current
  // placement it swaps only where no more experts move (migration_weight is not traded for it).
  const LoadTrace* expected = nullptr;
  std::vector<uint8_t> expected_layers;
  double expected_slack = 0.003;
  int expected_iterations = 32;  // swaps at most, in units of G
  int expected_budget = 128;     // swap trials, in units of P
  // Step 8: nodes (ranks / nodes consecutive ranks each) and expert groups (experts / groups
  // consecutive experts each); groups % nodes == 0. nodes = 1: one node, no hierarchy.
  int nodes = 1, groups = 1;
};

struct LayerPlanStats {
  double score = 0;       // sum over slices of max rank load (even splits)
  double bound = 0;       // sum over slices of the lower bound
  int moved = 0;          // (rank, expert) pairs new relative to current (0 without current)
};

// One layer.
//   slices: [S][E] with row stride `stride` (loads of S time slices; S = 1: the window's sum)
//   current_row: [P] or nullptr
//   expected: [E] or nullptr, the loads expected next (step 7; BallastOptions::expected is ignored here)
// returns physical_to_logical [P].
std::vector<int32_t> ballast_layer(const double* slices, int S, int E, size_t stride, const BallastOptions& opt,
                                   const int32_t* current_row = nullptr, LayerPlanStats* stats = nullptr,
                                   const double* expected = nullptr);

// All layers. slices: [S][L][E] (a LoadTrace whose passes are time slices).
Placement ballast_rebalance(const LoadTrace& slices, const BallastOptions& opt,
                            std::vector<LayerPlanStats>* stats = nullptr);

}  // namespace ballast::eplb
