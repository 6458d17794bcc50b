#pragma once
// What the binding files of the `ballast_eplb` module share: reading loads and placements, the
// deepseek-compatible plan, and the (phy2log, log2phy, logcnt) form of a placement.
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/placement.h"
#include "tensors.h"

#include <optional>

namespace ballast::python {

Dense summed(const Dense& d);                // [L, E] as given, [T, L, E] summed over T
eplb::LoadTrace to_trace(const Dense& d);    // [L, E] -> [1][L][E]; [T, L, E] as it is
// A placement phy2log [L, P] read from Python and validated (expect_*: -1 = any).
eplb::Placement to_placement(py::handle obj, const std::string& name, int experts, int ranks, int expect_layers,
                             int expect_physical, Origin* origin);
void check_plan_args(int experts, int num_replicas, int num_gpus);
// deepseek-ai/EPLB on w [L, E]: hierarchical or global as the original's rule, or as SGLang's
// enable_hierarchical says (a hierarchical request with groups not divisible by nodes is refused).
eplb::deepseek::Result deepseek_plan(const Dense& w, int num_replicas, std::optional<int> num_groups, int num_nodes,
                                     int num_gpus, std::optional<bool> enable_hierarchical);

// log2phy [L][E][X] (each expert's slots ascending, -1 padded) and logcnt [L][E] of phy2log [L][P],
// where -1 marks an empty slot.
struct LogicalMaps {
  std::vector<int32_t> log2phy, logcnt;
  int max_replicas = 0;
};
LogicalMaps logical_maps(const std::vector<int32_t>& phy2log, int layers, int physical, int experts);
py::tuple placement_tuple(const eplb::Placement& pl, const Origin& origin);  // (phy2log, log2phy, logcnt)

// vLLM's policy interface (vllm_policy.cpp).
void bind_vllm_policy(py::module_& m);

}  // namespace ballast::python
