#pragma once
// The expert-parallel load balancer of deepseek-ai/EPLB (eplb.py), reimplemented so that it gives
// identical outputs on identical inputs, tie-breaking included. Every rule that decides a tie is
// stated where it is applied:
//   - loads are converted to float32 first (the original calls weight.float()), and all per-replica
//     loads and pack sums are float32 (division w / cnt in float32; packs accumulate in float32);
//   - packing visits items in descending order of weight and picks the lightest pack with room, the
//     lowest pack index on equal weights (Python's min returns the first minimum). Equal weights are
//     visited in the order of `TieOrder`: the original's torch.sort(descending=True) is unstable and
//     its order among equal keys depends on the platform (docs/eplb.md, "Ties");
//   - replication adds a replica to the expert with the largest w / cnt, the lowest index on ties
//     (torch.max(dim) returns the first maximal index).
#include <cstdint>
#include <string>
#include <vector>

namespace ballast::eplb::deepseek {

// Order among equal weights in the packing sort.
//   std_sort (default): std::sort (libstdc++) with torch's descending comparator over (key, index)
//             pairs starting in index order, which is PyTorch's CPU sort_kernel_impl for
//             stable=False. Reproduces every stored case of the original, ties included (torch
//             2.11 and 1.13 on x86-64). With libstdc++ it equals `stable` up to 16 items
//             (insertion sort).
//   stable:   ascending index (what torch.sort(..., stable=True) gives on every platform).
// A PyTorch built with x86-simd-sort (USE_X86_SIMD_SORT, AVX2/AVX-512 kernels) can take
// x86simdsortStatic::keyvalue_qsort instead, whose order among equal keys is not emulated; nor is
// libc++'s std::sort (macOS builds). See docs/eplb.md, "Ties".
enum class TieOrder { stable, std_sort };
TieOrder parse_tie_order(const std::string& name);  // "stable" | "std_sort"

// Ties met by the packing sorts (adjacent equal keys after sorting), for parity claims:
//   cross: between items of different logical experts (or different groups when packing groups
//          onto nodes): their order changes physical_to_logical_map;
//   same:  between replicas of one expert: their order changes only which replica rank sits in
//          which slot (logical_to_physical_map), not physical_to_logical_map.
struct Ties {
  int cross = 0, same = 0;
};

// Packs n weighted items into num_packs packs of exactly n / num_packs items each.
//   weight: [n] float32
// returns pack_index [n] and rank_in_pack [n].
//   label: [n] or nullptr (items are distinct); ties: where to count ties, or nullptr.
void balanced_packing(const float* weight, int n, int num_packs, int32_t* pack_index, int32_t* rank_in_pack,
                      TieOrder order = TieOrder::std_sort, const int32_t* label = nullptr, Ties* ties = nullptr);

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
  Ties ties;                      // ties met by the packing sorts (all layers)
};

// Hierarchical policy: pack expert groups onto nodes, replicate within nodes, pack onto GPUs.
//   weight: [layers][num_logical] (any non-negative numbers; converted to float32 as the original)
Result rebalance_hierarchical(const double* weight, int layers, int num_logical, int num_physical, int num_groups,
                              int num_nodes, int num_gpus, TieOrder order = TieOrder::std_sort);

// The entry point of eplb.py: hierarchical when num_groups % num_nodes == 0, else the global
// policy (hierarchical with one group and one node).
Result rebalance_experts(const double* weight, int layers, int num_logical, int num_replicas, int num_groups,
                         int num_nodes, int num_gpus, TieOrder order = TieOrder::std_sort);

}  // namespace ballast::eplb::deepseek
