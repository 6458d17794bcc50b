#pragma once
// Dispatch policies: given one pass's routed token counts per logical expert and a layer's
// placement, how many tokens each physical slot receives. Pure functions.
//   row: physical_to_logical [P] of the layer; counts: [E] tokens routed to each logical expert.
// All return slot loads [P] (what the recorder counts after dispatch).
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ballast/core/hash.h"

namespace ballast::eplb {

enum class Dispatch { static_, random, balanced };
Dispatch parse_dispatch(const std::string& name);  // "static" | "random" | "balanced"
std::string dispatch_name(Dispatch d);

// Static table [G][E] -> slot: a source rank uses a replica on itself if it holds one, else one on
// its node (ranks_per_node ranks per node; 0 = one node), else one of all replicas; the source
// ranks without a replica are shared out fairly among the candidates (each replica serves its own
// rank plus an equal number of others, +-1; as SGLang's `_fair_choices`, but deterministic: the
// candidate serving fewest so far, lower slot on ties).
std::vector<int32_t> static_table(std::span<const int32_t> row, int ranks, int ranks_per_node, int experts);

// Static dispatch with each expert's tokens coming evenly from all G source ranks (fractional
// slot loads: expert e's count times the share of source ranks that map to the slot).
std::vector<double> dispatch_static(std::span<const int32_t> row, int ranks, int ranks_per_node, const double* counts,
                                    int experts);

// Random: token t of expert e goes to replica hash(seed, e, t) mod c_e (all ranks agree).
// counts must be integers.
std::vector<double> dispatch_random(std::span<const int32_t> row, const double* counts, int experts, uint64_t seed);

// Balanced: integer split of each expert's tokens over its replicas that minimises the largest
// rank load of this pass, exactly (binary search on the max load, feasibility by max-flow
// from experts to the ranks holding them). counts must be integers.
std::vector<double> dispatch_balanced(std::span<const int32_t> row, int ranks, const double* counts, int experts);

// Slots holding each logical expert [E][c_e], ascending; throws unless every slot holds an expert
// in [0, E) and every expert has a replica.
std::vector<std::vector<int32_t>> replicas_of(std::span<const int32_t> row, int experts);
// The hash the random policy picks replicas with.
using ballast::mix64;

// Any policy, by name.
std::vector<double> dispatch(Dispatch policy, std::span<const int32_t> row, int ranks, int ranks_per_node,
                             const double* counts, int experts, uint64_t seed = 0);

}  // namespace ballast::eplb
