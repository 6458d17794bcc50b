#pragma once
#include "ballast/core/tensor.h"

namespace ballast::moe {

// One SwiGLU expert: down(silu(gate x) * up x). gate/up [I, H], down [H, I]; any storage dtype.
struct ExpertWeights {
  Tensor gate, up, down;
  int64_t intermediate() const { return gate.dim(0); }
  size_t nbytes() const { return gate.nbytes() + up.nbytes() + down.nbytes(); }
};

}  // namespace ballast::moe
