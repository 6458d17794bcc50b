#pragma once
// Expert-parallel execution of one domain's MoE layers, as large deployments run it: each rank
// routes its own tokens, picks a physical slot for every routed choice (dispatch policy over the
// placement in force), sends the token rows to the ranks holding those slots (all-to-all
// dispatch), computes the experts it holds, and sends results back to be combined (all-to-all
// combine). Records the slots it dispatched to into its domain's recorder.
#include "ballast/dist/communicator.h"
#include "ballast/moe/expert_domain.h"
#include "ballast/moe/moe_runner.h"
#include "ballast/moe/slot_store.h"

namespace ballast::moe {

class ExpertParallelRunner final : public MoeRunner {
 public:
  ExpertParallelRunner(ExpertDomain& domain, const SlotStore& slots, dist::Communicator& comm);

  void run(kernels::Ops& ops, int layer, const Tensor& x, const Routing& routing,
           std::span<const ExpertWeights> experts, Tensor& out) override;

  // A deliberately broken wiring, for tests only: dispatch through `other`'s layer-0 tables and
  // record into its recorder, as the MTP layer did in SGLang before its fix. Lets a test prove
  // that it catches that bug.
  void wire_to_foreign_tables_for_test(ExpertDomain& other) { tables_ = &other; }

 private:
  ExpertDomain& domain_;
  ExpertDomain* tables_;  // whose placement and recorder this runner uses (its own domain)
  const SlotStore& slots_;
  dist::Communicator& comm_;
};

}  // namespace ballast::moe
