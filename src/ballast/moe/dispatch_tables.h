#pragma once
// The device side of an expert domain's placement (SGLang's ExpertLocationMetadata, per rank):
// for every layer the tables the dispatch op reads, derived from physical_to_logical once when a
// layer's placement switches and uploaded, never rebuilt per pass. Fixed addresses: a switch
// overwrites a layer's rows in place, so views (and captured graphs) stay valid.
#include <vector>

#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/placement.h"
#include "ballast/kernels/backend.h"
#include "ballast/kernels/ops.h"

namespace ballast::moe {

class DispatchTables {
 public:
  DispatchTables(kernels::Backend& backend, const eplb::Placement& placement, eplb::Dispatch policy, int rank,
                 int ranks_per_node);

  // The tables of layer l, as the dispatch op takes them.
  kernels::DispatchTables layer(int l) const;
  // Re-derives layer l's tables from placement.layer(l) and uploads them.
  void update_layer(int l, const eplb::Placement& placement);
  // The domain's pass index (random dispatch seeds from it); uploaded when it changes.
  void set_pass(int64_t pass);

 private:
  kernels::Backend& be_;
  eplb::Dispatch policy_;
  int rank_, ranks_, ranks_per_node_, layers_, experts_, physical_, max_replicas_;
  Tensor phy2log_, static_slot_, replicas_, replica_count_;  // [L][P], [L][E], [L][E][Rmax], [L][E]
  Tensor pass_seed_;                                          // [1] I64
};

}  // namespace ballast::moe
