#pragma once
// How a MoE layer's routed experts are computed: every expert on this rank (LocalMoeRunner), or
// across expert-parallel ranks (ExpertParallelRunner). The model hands over the routed choices
// (device tensors from the topk op); the runner dispatches, computes and combines them. Under
// expert parallelism the runner also owns placement and load recording for its expert domain.
#include <span>

#include "ballast/kernels/ops.h"
#include "ballast/kernels/workspace.h"

namespace ballast::moe {

class MoeRunner {
 public:
  virtual ~MoeRunner() = default;
  // out[t] += sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for the domain's MoE layer `layer`
  // (its index within the domain); ids, weights [T, k]. `experts`: the layer's logical experts,
  // read by a runner that computes them here. `out` may still be written by side work (the shared
  // expert, Ops::side): the runner joins it before it adds into `out`.
  virtual void run(int layer, const Tensor& x, const Tensor& ids, const Tensor& weights,
                   std::span<const kernels::SwigluWeights> experts, kernels::Workspace& ws, Tensor& out) = 0;
  // run, then what the model does after the layer (`then`: the residual add of out and the next
  // RMSNorm): left pending where the runner's last op can start the norm as it stores out
  // (Ops::moe_routed_add_norm), otherwise finished. `shared` (only where fuses_shared said yes):
  // the layer's shared expert computed in the same pass, its rows in place of out's contents.
  virtual kernels::PendingNorm run_add_norm(int layer, const Tensor& x, const Tensor& ids, const Tensor& weights,
                                            std::span<const kernels::SwigluWeights> experts,
                                            const kernels::SharedExpert* shared, kernels::Workspace& ws, Tensor& out,
                                            const kernels::AddNorm& then) = 0;
  // Whether run_add_norm computes `shared` in the routed experts' pass for these shapes; where not,
  // the model computes it itself (beside routing: Ops::side).
  virtual bool fuses_shared(const Tensor& x, const Tensor& ids, std::span<const kernels::SwigluWeights> experts,
                            const kernels::SharedExpert& shared) const {
    (void)x, (void)ids, (void)experts, (void)shared;
    return false;
  }
};

// Every expert computed on the caller's rank: the choices grouped by expert, one grouped product
// per expert, combined in top-k order; or, where the backend has it for these shapes (few tokens),
// all of that in one pass (Ops::moe_routed).
class LocalMoeRunner final : public MoeRunner {
 public:
  explicit LocalMoeRunner(kernels::Ops& ops) : ops_(ops) {}
  void run(int layer, const Tensor& x, const Tensor& ids, const Tensor& weights,
           std::span<const kernels::SwigluWeights> experts, kernels::Workspace& ws, Tensor& out) override;
  kernels::PendingNorm run_add_norm(int layer, const Tensor& x, const Tensor& ids, const Tensor& weights,
                                    std::span<const kernels::SwigluWeights> experts, const kernels::SharedExpert* shared,
                                    kernels::Workspace& ws, Tensor& out, const kernels::AddNorm& then) override;
  // Where the backend's one pass takes the shared expert too (Ops::moe_routed_fits with it).
  bool fuses_shared(const Tensor& x, const Tensor& ids, std::span<const kernels::SwigluWeights> experts,
                    const kernels::SharedExpert& shared) const override {
    return ops_.moe_routed_fits(x, ids, experts, &shared);
  }

 private:
  kernels::Ops& ops_;
};

}  // namespace ballast::moe
