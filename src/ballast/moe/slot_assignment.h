#pragma once
// Token-level dispatch: which physical slot serves each routed choice of this rank's tokens,
// under one of the EPLB dispatch policies (spec/EPLB.md). Deterministic: every rank computes
// the same split from the same inputs.
#include <cstdint>
#include <span>
#include <vector>

#include "ballast/eplb/dispatch.h"
#include "ballast/moe/router.h"

namespace ballast::moe {

struct SlotAssignmentInput {
  eplb::Dispatch policy = eplb::Dispatch::static_;
  std::span<const int32_t> row;  // physical_to_logical [P] of the layer
  int ranks = 1, ranks_per_node = 0, rank = 0, experts = 0;
  // balanced only: routed counts of every rank this pass, [G][E].
  std::span<const int64_t> counts_by_rank;
  uint64_t seed = 0;  // random only: differs per pass and layer
};

// Returns the physical slot of each routed choice [tokens * k] of `routing`.
std::vector<int32_t> assign_slots(const SlotAssignmentInput& in, const Routing& routing);

// Routed counts [E] of one rank's tokens.
std::vector<int64_t> routed_counts(const Routing& routing, int experts);

}  // namespace ballast::moe
