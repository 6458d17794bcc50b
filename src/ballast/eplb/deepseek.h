#pragma once
// The expert-parallel load balancer of deepseek-ai/EPLB (eplb.py), reimplemented so that it gives
// identical outputs on identical inputs, tie-breaking included. Every rule that decides a tie is
// stated where it is applied:
//   - loads are converted to float32 first (the original calls weight.float()), and all per-replica
//     loads and pack sums are float32 (division w / cnt in float32; packs accumulate in float32);
//   - packing visits items in descending order of weight, equal weights in ascending index order
//     (torch.sort on CPU is a stable sort), and picks the lightest pack with room, the lowest pack
//     index on equal weights (Python's min returns the first minimum);
//   - replication adds a replica to the expert with the largest w / cnt, the lowest index on ties
//     (torch.max(dim) returns the first maximal index).
#include <cstdint>
#include <vector>

namespace ballast::eplb::deepseek {

// Packs n weighted items into num_packs packs of exactly n / num_packs items each.
//   weight: [n] float32
// returns pack_index [n] and rank_in_pack [n].
void balanced_packing(const float* weight, int n, int num_packs, int32_t* pack_index, int32_t* rank_in_pack);

// Replicates num_log experts to num_phy replicas minimising the largest per-replica load.
//   weight: [num_log] float32
// returns phy2log [num_phy], rank [num_phy] (replica rank of each slot), logcnt [num_log].
void replicate_experts(const float* weight, int num_log, int num_phy, int32_t* phy2log, int32_t* rank,
                       int32_t* logcnt);

struct Result {
  int layers = 0, logical = 0, physical = 0;
  int max_replicas = 0;           // X
  std::vector<int32_t> phy2log;   // physical_to_logical_map [L][P]
  std::vector<int32_t> phyrank;   // replica rank of each slot [L][P]
  std::vector<int32_t> log2phy;   // logical_to_physical_map [L][E][X], -1 padded, by replica rank
  std::vector<int32_t> logcnt;    // expert_count [L][E]
};

// Hierarchical policy: pack expert groups onto nodes, replicate within nodes, pack onto GPUs.
//   weight: [layers][num_logical] (any non-negative numbers; converted to float32 as the original)
Result rebalance_hierarchical(const double* weight, int layers, int num_logical, int num_physical, int num_groups,
                              int num_nodes, int num_gpus);

// The entry point of eplb.py: hierarchical when num_groups % num_nodes == 0, else the global
// policy (hierarchical with one group and one node).
Result rebalance_experts(const double* weight, int layers, int num_logical, int num_replicas, int num_groups,
                         int num_nodes, int num_gpus);

}  // namespace ballast::eplb::deepseek
