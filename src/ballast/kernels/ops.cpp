// What ops.h's ops compute where a backend keeps no form of its own: the norm finished at once, gated
// attention as its three ops.
#include "ballast/kernels/ops.h"

#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

void Ops::matmul_many_normed(const PendingNorm& n, Tensor& h, std::span<const Tensor> w, std::span<Tensor> y) {
  check_matmul_many_normed(n, h, w, y);
  check(n.parts == 0, "matmul_many_normed: this backend leaves no norm pending, yet {} partial sums came", n.parts);
  if (h.defined() && h.raw() != n.s.raw()) copy(n.s, h);
  if (!w.empty()) matmul_many(n.s, w, y);
}

PendingNorm Ops::matmul_add_norm(const Tensor& o, const Tensor& w_out, Tensor& d, const AddNorm& then) {
  check_matmul_add_norm(o, w_out, d, then);
  matmul(o, w_out, d);
  return add_norm_finished(*this, then, d);
}

PendingNorm Ops::moe_routed_add_norm(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                     std::span<const SwigluWeights> experts, const SharedExpert* shared, Tensor& out,
                                     const AddNorm& then) {
  check(shared == nullptr, "moe_routed_add_norm: this backend computes a shared expert only beside the routed ones "
        "(moe_routed_fits with it is false)");
  moe_routed(x, ids, weights, experts, out);
  return add_norm_finished(*this, then, out);
}

void Ops::gated_attention(const Tensor& qg, const QkNormRope& r, Tensor& q, Tensor& gate, Tensor& k, const Tensor& v,
                          Tensor& k_cache, Tensor& v_cache, const SeqLayout& layout, Tensor& out) {
  qk_norm_rope(qg, r.q_norm, r.k_norm, r.eps, r.positions, r.rot, r.theta, q, gate, k);
  attention(q, k, v, k_cache, v_cache, layout, out);
  mul_sigmoid(out, gate);
}

PendingNorm add_norm_finished(Ops& ops, const AddNorm& then, const Tensor& d) {
  Tensor x = then.x, h = then.h;
  ops.add_rms_norm(x, d, then.w, then.eps, h);
  return {h, Tensor(), 0, then.eps};
}

}  // namespace ballast::kernels
