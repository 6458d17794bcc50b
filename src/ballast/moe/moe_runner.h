#pragma once
// How a MoE layer's routed experts are executed: locally (every expert on this rank), or across
// expert-parallel ranks. The model hands over routed tokens; the runner owns placement, dispatch
// and load recording for its expert domain.
#include <span>

#include "ballast/kernels/ops.h"
#include "ballast/moe/expert_weights.h"
#include "ballast/moe/router.h"

namespace ballast::moe {

class MoeRunner {
 public:
  virtual ~MoeRunner() = default;
  // out[t] += sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for the domain's MoE layer
  // `layer` (its index within the domain). `experts` are this layer's logical expert weights.
  virtual void run(kernels::Ops& ops, int layer, const Tensor& x, const Routing& routing,
                   std::span<const ExpertWeights> experts, Tensor& out) = 0;
};

// Every expert computed here, on the caller's rank.
class LocalMoeRunner final : public MoeRunner {
 public:
  void run(kernels::Ops& ops, int layer, const Tensor& x, const Routing& routing,
           std::span<const ExpertWeights> experts, Tensor& out) override;
};

}  // namespace ballast::moe
