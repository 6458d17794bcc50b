#include "ballast/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "ballast/core/error.h"

namespace ballast::runtime {

int32_t argmax(std::span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[size_t(best)]) best = int32_t(i);
  return best;
}

std::vector<float> distribution(std::span<const float> logits, const SamplingParams& sp) {
  std::vector<float> p(logits.size(), 0.0f);
  if (sp.greedy()) {
    p[size_t(argmax(logits))] = 1.0f;
    return p;
  }
  check(sp.top_p > 0.0f && sp.top_p <= 1.0f && sp.top_k >= 0, "sampling: top_p must be in (0, 1], top_k >= 0");
  const float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) sum += (p[i] = std::exp((logits[i] - mx) / sp.temperature));
  for (auto& v : p) v = float(v / sum);
  if (sp.top_k == 0 && sp.top_p >= 1.0f) return p;
  // Keep the k most likely tokens (ties to the lower index), then the smallest prefix of them
  // whose mass reaches top_p.
  std::vector<int32_t> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  const auto before = [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)] || (p[size_t(a)] == p[size_t(b)] && a < b); };
  size_t keep = sp.top_k > 0 ? std::min(order.size(), size_t(sp.top_k)) : order.size();
  std::partial_sort(order.begin(), order.begin() + long(keep), order.end(), before);
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) {
    mass += p[size_t(order[i])];
    if (mass >= sp.top_p) {
      keep = i + 1;
      break;
    }
  }
  std::vector<float> out(p.size(), 0.0f);
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += p[size_t(order[i])];
  for (size_t i = 0; i < keep; ++i) out[size_t(order[i])] = float(p[size_t(order[i])] / kept);
  return out;
}

int32_t sample(std::span<const float> probs, std::mt19937_64& rng) {
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  double c = 0;
  int32_t last = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0) continue;
    c += probs[i];
    last = int32_t(i);
    if (u < c) return int32_t(i);
  }
  return last;  // rounding left u above the total: the last token with mass
}

Acceptance accept_or_resample(std::span<const float> p, std::span<const float> q, int32_t draft, std::mt19937_64& rng) {
  const float pd = p[size_t(draft)], qd = q[size_t(draft)];
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  if (qd > 0 && u < std::min(1.0, double(pd) / double(qd))) return {true, draft};
  std::vector<float> residual(p.size());
  double sum = 0;
  for (size_t i = 0; i < p.size(); ++i) sum += (residual[i] = std::max(0.0f, p[i] - q[i]));
  if (sum <= 0) return {false, sample(p, rng)};  // p == q: never reached with u < 1, kept for safety
  for (auto& v : residual) v = float(v / sum);
  return {false, sample(residual, rng)};
}

}  // namespace ballast::runtime
