#include "ballast/moe/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "ballast/core/error.h"

namespace ballast::moe {

Routing route_topk(const float* logits, int64_t T, int E, int k, bool normalize) {
  check(k >= 1 && k <= E, "route_topk: k={} with {} experts", k, E);
  Routing r;
  r.tokens = T;
  r.k = k;
  r.experts.resize(size_t(T * k));
  r.weights.resize(size_t(T * k));
  std::vector<float> p(static_cast<size_t>(E));
  std::vector<int32_t> idx(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    const float mx = *std::max_element(l, l + E);
    float sum = 0;
    for (int e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
    for (int e = 0; e < E; ++e) p[e] /= sum;
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float ksum = 0;
    for (int j = 0; j < k; ++j) ksum += p[idx[j]];
    for (int j = 0; j < k; ++j) {
      r.experts[t * k + j] = idx[j];
      r.weights[t * k + j] = normalize ? p[idx[j]] / ksum : p[idx[j]];
    }
  }
  return r;
}

}  // namespace ballast::moe
