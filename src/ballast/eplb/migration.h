#pragma once
// Migration planner: the ordered weight copies that turn an old placement into a new one.
// For every destination slot whose expert changes: copy from a slot of the same rank if the rank
// already holds the expert (local), else receive from a rank holding it, same node first, the
// sender with the fewest sends so far (ties: lower slot). Sources are read from the old
// placement (the old tables stay in force until a layer's copies are all done). Deterministic.
#include "ballast/eplb/placement.h"

#include <cstdint>
#include <span>
#include <vector>

namespace ballast::eplb {

enum class CopyKind { local = 0, intra_node = 1, inter_node = 2 };

struct Copy {
  int layer, expert;
  int src_slot, src_rank;
  int dst_slot, dst_rank;
  CopyKind kind;
};

struct MigrationPlan {
  std::vector<Copy> copies;  // local first, then same node, then across nodes; by layer, slot
  int local = 0, intra_node = 0, inter_node = 0;
  int experts_moved = 0;        // copies between ranks (intra + inter)
  int64_t bytes_moved = 0;      // experts_moved * bytes_per_expert
  std::vector<int> sent, received;  // [G] experts sent / received by each rank
  std::vector<int64_t> bytes_sent, bytes_received;  // [G]
};

// ranks_per_node: 0 = all ranks on one node.
MigrationPlan plan_migration(const Placement& old_placement, const Placement& new_placement, int ranks_per_node,
                             int64_t bytes_per_expert = 0);

// The same experts per rank as `next`, reordered within each rank so that an expert the rank held
// before stays in its old slot (its weights need no copy at all, not even a local one); the
// experts new to the rank fill the remaining slots in their order in `next`. vLLM's
// preserve-intra-GPU-slots post-pass has these semantics. Layers, slots and ranks must match.
//   rows: [L][P] each (a value < 0 in `old` is an empty slot)
std::vector<int32_t> keep_slots(std::span<const int32_t> next, std::span<const int32_t> old, int layers, int physical,
                                int ranks);
Placement keep_slots(const Placement& next, const Placement& old);

// Slots whose expert is the same in both placements (no copy needed), per layer [L].
std::vector<int> slots_kept(const Placement& a, const Placement& b);

}  // namespace ballast::eplb
