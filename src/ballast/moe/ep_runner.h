#pragma once
// Expert-parallel execution of one domain's MoE layers, as large deployments run it, all on the
// device side of the backend contract (docs/expert-parallel.md): each rank routes its own
// tokens; the dispatch op picks a physical slot for every routed choice through the layer's
// tables (static, random, or balanced over every rank's counts, exchanged on the data plane); the
// choices are counted into the domain's per-pass load buffer; rows go to the ranks holding their
// slots (all_to_all_v), each rank computes its slots' experts in one grouped product, and the
// results come back (all_to_all_v) to be combined in top-k order.
#include "ballast/dist/data_plane.h"
#include "ballast/kernels/backend.h"
#include "ballast/moe/dispatch_tables.h"
#include "ballast/moe/moe_runner.h"
#include "ballast/moe/slot_store.h"

namespace ballast::moe {

class ExpertParallelRunner final : public MoeRunner {
 public:
  // tables: the placement it dispatches through; slots: the weights it computes with; counts
  // [L, P] I32: where it adds the slots it dispatched to (the domain's load of the open pass);
  // max_tokens: the most rows any rank runs in one pass (bounds what a rank can receive); token_slots
  // [L, max_tokens * k], if defined: where each layer's chosen slots are also kept (a per-token
  // trace). Tables, slots and counts normally belong to one domain: wiring them to different
  // domains is the bug of SGLang's MTP layer before its fix, which tests/runtime reproduces with
  // this constructor.
  ExpertParallelRunner(kernels::Backend& backend, const DispatchTables& tables, const SlotStore& slots, Tensor counts,
                       dist::DataPlane& data, int max_tokens, Tensor token_slots = {});

  void run(int layer, const Tensor& x, const Tensor& ids, const Tensor& weights,
           std::span<const kernels::SwigluWeights> experts, kernels::Workspace& ws, Tensor& out) override;
  // run, then the norm finished (the combine's rows arrive from other ranks). The shared expert is
  // never fused here (fuses_shared is false): `shared` must be null.
  kernels::PendingNorm run_add_norm(int layer, const Tensor& x, const Tensor& ids, const Tensor& weights,
                                    std::span<const kernels::SwigluWeights> experts, const kernels::SharedExpert* shared,
                                    kernels::Workspace& ws, Tensor& out, const kernels::AddNorm& then) override;

 private:
  kernels::Ops& ops_;
  const DispatchTables& tables_;
  const SlotStore& slots_;
  Tensor counts_;
  dist::DataPlane& data_;
  int max_tokens_;
  Tensor token_slots_;
};

}  // namespace ballast::moe
