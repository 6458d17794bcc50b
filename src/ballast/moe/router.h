#pragma once
// Softmax top-k routing, as the Qwen MoE block does it: p = softmax(logits) in fp32, keep the k
// largest (ties to the lower expert id), optionally renormalise them to sum to 1.
#include <cstdint>
#include <vector>

namespace ballast::moe {

struct Routing {
  int64_t tokens = 0;
  int k = 0;
  std::vector<int32_t> experts;  // [tokens, k] logical expert ids, by decreasing weight
  std::vector<float> weights;    // [tokens, k]
};

// logits: [T, E] row-major.
Routing route_topk(const float* logits, int64_t T, int E, int k, bool normalize);

}  // namespace ballast::moe
