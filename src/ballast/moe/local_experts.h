#pragma once
// Runs routed experts on this rank: tokens grouped by expert, one gathered matmul chain per expert,
// results scaled by their routing weight and added into `out`.
#include <span>

#include "ballast/kernels/ops.h"
#include "ballast/moe/expert_weights.h"

namespace ballast::moe {

// An assignment of token rows to one expert: rows of x and their routing weights.
struct ExpertBatch {
  std::vector<int32_t> rows;
  std::vector<float> scale;
};

// out[rows[i]] += scale[i] * expert(x[rows[i]]) for one expert.
void run_expert(kernels::Ops& ops, const ExpertWeights& w, const Tensor& x, const ExpertBatch& batch, Tensor& out);

// out[t] = expert(x[t]) for every row (the dense MLP and the shared expert).
void run_dense(kernels::Ops& ops, const ExpertWeights& w, const Tensor& x, Tensor& out);

}  // namespace ballast::moe
