#pragma once
// Balance metrics of docs/eplb.md. A layer's rank load is the sum of the loads of the slots on the
// rank; balancedness = mean / max of rank loads (1 = perfect, 1/G = worst); imbalance = max/mean - 1.
#include "ballast/eplb/load.h"
#include "ballast/eplb/placement.h"

#include <span>
#include <vector>

namespace ballast::eplb {

// Rank loads [G] of one layer when each expert's load w [E] is split evenly over its replicas
// (the assumption under which placements are planned).
//   row: physical_to_logical [P] of the layer
std::vector<double> rank_loads_even(std::span<const int32_t> row, int ranks, const double* w, int experts);
// Rank loads [G] from slot loads [P].
std::vector<double> rank_loads_from_slots(std::span<const double> slot_load, int ranks);

// Components of the replica graph of a layer: ranks are nodes, an expert with replicas on several
// ranks links them. Balanced dispatch moves a pass's load only along these links, so with one
// component it can even out any rank; with G isolated ranks it is static dispatch.
int replica_graph_components(std::span<const int32_t> row, int ranks, int experts);
double balancedness(std::span<const double> rank_load);  // mean / max (1 when all zero)
double imbalance(std::span<const double> rank_load);     // max / mean - 1 (0 when all zero)

// Lower bound on the max rank load of a layer with P slots on G ranks, even splits over replicas:
// max( sum(w)/G, min over replica counts (sum = P, 1 <= c_e) of max_e w_e / c_e ).
//   w: [E]
double max_load_lower_bound(const double* w, int experts, int physical, int ranks);

// Replica counts [E] minimising max_e w_e / c_e with sum c = physical and 1 <= c_e <= cap
// (cap = ranks when replicas must sit on distinct ranks). Ties go to the lower expert index.
std::vector<int32_t> optimal_replica_counts(const double* w, int experts, int physical, int cap);

struct LayerBalance {
  std::vector<double> balancedness;  // [L]
  std::vector<double> max_load;      // [L]
  std::vector<double> bound;         // [L] max_load_lower_bound
  double mean = 0;                   // mean over layers of balancedness (SGLang's figure)
  double worst = 1;                  // min over layers
  int worst_layer = 0;
  double mean_imbalance = 0;         // mean over layers of max/mean - 1
  double achieved_over_bound = 1;    // mean over layers of max_load / bound
};

// In-sample balance of a placement on a load matrix [L][E] (even splits over replicas).
LayerBalance evaluate_even(const Placement& placement, const LoadTrace& load, int pass = 0);

// Balance from measured tokens per rank [L][G] (what each rank actually computed in a pass or a
// window), no placement needed. Two aggregates over layers are in use:
//   balancedness: vLLM's, sum over layers of the mean rank load / sum of the max (0 when no token)
//   mean:         SGLang's, the mean over layers of each layer's mean / max (a layer without
//                 tokens counts as 1)
struct MeasuredBalance {
  double avg_tokens = 0;        // sum over layers of the mean over ranks
  double max_tokens = 0;        // sum over layers of the max over ranks
  double balancedness = 0;      // avg_tokens / max_tokens
  std::vector<double> per_layer;  // [L] mean / max
  double mean = 1;              // mean of per_layer
};
MeasuredBalance measured_balance(const double* tokens, int layers, int ranks);

}  // namespace ballast::eplb
