#include "ballast/moe/moe_runner.h"

namespace ballast::moe {

void LocalMoeRunner::run(int, const Tensor& x, const Tensor& ids, const Tensor& weights,
                         std::span<const kernels::SwigluWeights> experts, kernels::Workspace& ws, Tensor& out) {
  if (ops_.moe_routed_fits(x, ids, experts, nullptr)) {  // few tokens: one pass, no grouping
    ops_.join_side();
    ops_.moe_routed(x, ids, weights, experts, out);
    return;
  }
  const int64_t T = ids.dim(0), k = ids.dim(1), N = T * k, E = int64_t(experts.size());
  const Tensor choices = ids.reshape({N});
  Tensor perm = ws.take({N}, DType::I32), counts = ws.take({E}, DType::I32), offsets = ws.take({E + 1}, DType::I32);
  Tensor none;
  ops_.group_by(choices, none, 1, int(E), perm, counts, offsets, none);
  Tensor y = ws.take({N, x.dim(1)});  // row t*k + j: expert ids[t, j] applied to x[t]
  ops_.moe_experts(x, perm, offsets, int(k), experts, y);
  ops_.join_side();
  ops_.moe_combine(y, none, weights, out);
}

kernels::PendingNorm LocalMoeRunner::run_add_norm(int layer, const Tensor& x, const Tensor& ids, const Tensor& weights,
                                                  std::span<const kernels::SwigluWeights> experts,
                                                  const kernels::SharedExpert* shared, kernels::Workspace& ws,
                                                  Tensor& out, const kernels::AddNorm& then) {
  // (With `shared`, fuses_shared has said the one pass takes it; moe_routed_add_norm checks again.)
  if (shared || ops_.moe_routed_fits(x, ids, experts, nullptr)) {
    ops_.join_side();
    return ops_.moe_routed_add_norm(x, ids, weights, experts, shared, out, then);
  }
  run(layer, x, ids, weights, experts, ws, out);
  return kernels::add_norm_finished(ops_, then, out);
}

}  // namespace ballast::moe
