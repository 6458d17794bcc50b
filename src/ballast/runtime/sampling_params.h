#pragma once
// How a request's tokens are drawn (OpenAI/SGLang sampling parameters); the drawing itself is an
// op (kernels::Ops::sample), the math in kernels/sampling.h.
#include <cstdint>

namespace ballast::runtime {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;
  int top_k = 0;             // 0: all
  uint64_t seed = 0;
  bool greedy() const { return temperature <= 0.0f; }
};

// The seed of the i-th sequence of a batch: each sequence draws from its own stream, so that its
// samples do not depend on what else is in the batch.
inline uint64_t sequence_seed(const SamplingParams& p, uint64_t i) { return p.seed * 0x9e3779b97f4a7c15ULL + i; }

}  // namespace ballast::runtime
