#include "ballast/moe/local_experts.h"

namespace ballast::moe {

namespace {
// y[T, H] = down(silu(gate x) * up x)
void swiglu(kernels::Ops& ops, const ExpertWeights& w, const Tensor& x, Tensor& y) {
  const int64_t T = x.dim(0), I = w.intermediate();
  Tensor g = ops.alloc({T, I}), u = ops.alloc({T, I});
  ops.matmul(x, w.gate, g);
  ops.matmul(x, w.up, u);
  ops.silu_mul(g, u, g);
  ops.matmul(g, w.down, y);
}
}  // namespace

void run_expert(kernels::Ops& ops, const ExpertWeights& w, const Tensor& x, const ExpertBatch& batch, Tensor& out) {
  const int64_t n = int64_t(batch.rows.size());
  if (n == 0) return;
  Tensor xe = ops.alloc({n, x.dim(1)});
  ops.gather_rows(x, batch.rows, xe);
  Tensor ye = ops.alloc({n, out.dim(1)});
  swiglu(ops, w, xe, ye);
  ops.scatter_add_rows(ye, batch.rows, batch.scale, out);
}

void run_dense(kernels::Ops& ops, const ExpertWeights& w, const Tensor& x, Tensor& out) { swiglu(ops, w, x, out); }

}  // namespace ballast::moe
