#include "ballast/moe/moe_runner.h"

#include "ballast/moe/local_experts.h"

namespace ballast::moe {

void LocalMoeRunner::run(kernels::Ops& ops, int, const Tensor& x, const Routing& routing,
                         std::span<const ExpertWeights> experts, Tensor& out) {
  std::vector<ExpertBatch> by_expert(experts.size());
  for (int64_t t = 0; t < routing.tokens; ++t)
    for (int j = 0; j < routing.k; ++j) {
      auto& b = by_expert[size_t(routing.experts[t * routing.k + j])];
      b.rows.push_back(int32_t(t));
      b.scale.push_back(routing.weights[t * routing.k + j]);
    }
  for (size_t e = 0; e < experts.size(); ++e) run_expert(ops, experts[e], x, by_expert[e], out);
}

}  // namespace ballast::moe
