#pragma once
// One expert domain under expert parallelism, everything a rank needs for it: the host state
// (placement, recorder, schedule options), its device tables, the slots it holds, its per-pass
// load buffer, the runner its MoE layers go through and its rebalancer. The trunk's MoE layers
// form one domain, the MTP head's another; nothing is shared between them.
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ballast/core/log.h"
#include "ballast/dist/communicator.h"
#include "ballast/dist/data_plane.h"
#include "ballast/kernels/backend.h"
#include "ballast/moe/dispatch_tables.h"
#include "ballast/moe/ep_runner.h"
#include "ballast/moe/expert_domain.h"
#include "ballast/moe/rebalancer.h"
#include "ballast/moe/slot_store.h"

namespace ballast::moe {

struct ExpertParallelSetup {
  kernels::Backend& backend;
  dist::Communicator& control;
  dist::DataPlane& data;
  int max_tokens = 0;  // the most rows any rank runs in one pass
  int top_k = 0;       // routed choices per row
  Logger log;
  // While a domain's slots are filled (this rank's experts uploaded): bytes done of its total.
  std::function<void(const std::string& domain, uint64_t done, uint64_t total)> fill_progress;
};

class ExpertParallelDomain {
 public:
  // Places one domain's MoE layers (`layers[l]`: layer l's logical experts, host tensors) over the
  // ranks with `initial`, uploads this rank's slots and builds its runner and schedule. `load` is
  // a device view [L, P] I32 the caller owns, for the per-pass load.
  ExpertParallelDomain(std::string name, const std::vector<std::span<const kernels::SwigluWeights>>& layers,
                       eplb::Placement initial, const DomainOptions& options, Tensor load,
                       const ExpertParallelSetup& setup);
  ExpertParallelDomain(const ExpertParallelDomain&) = delete;
  ExpertParallelDomain& operator=(const ExpertParallelDomain&) = delete;

  // Closes the domain's pass on every rank, with the pass's load summed over ranks (the caller
  // all-reduces and downloads it with the pass's other results) and the number of rows this rank
  // ran. In per_token recorder mode the slots of this rank's choices come back too (one more
  // download: the price of a trace).
  void end_pass(std::span<const int32_t> load_host, int64_t rows);

  ExpertDomain domain;
  DispatchTables tables;
  SlotStore slots;
  Tensor load;
  Tensor token_slots;  // per_token mode: [L, max_tokens * k] the slots of this rank's choices
  ExpertParallelRunner runner;
  Rebalancer rebalancer;

 private:
  kernels::Backend& backend_;
  int top_k_;
};

}  // namespace ballast::moe
