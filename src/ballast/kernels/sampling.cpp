#include "ballast/kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "ballast/core/error.h"

namespace ballast::kernels {

int32_t argmax(std::span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[size_t(best)]) best = int32_t(i);
  return best;
}

void distribution(std::span<const float> logits, float temperature, float top_p, int top_k, std::span<float> out) {
  check(out.size() == logits.size() && !logits.empty(), "distribution: {} logits into {} probabilities",
        logits.size(), out.size());
  if (temperature <= 0.0f) {
    std::fill(out.begin(), out.end(), 0.0f);
    out[size_t(argmax(logits))] = 1.0f;
    return;
  }
  check(top_p > 0.0f && top_p <= 1.0f && top_k >= 0, "sampling: top_p must be in (0, 1], top_k >= 0 (got {}, {})",
        top_p, top_k);
  const float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) sum += (out[i] = std::exp((logits[i] - mx) / temperature));
  for (auto& v : out) v = float(v / sum);
  if (top_k == 0 && top_p >= 1.0f) return;
  // Keep the k most likely tokens (ties to the lower index), then the smallest prefix of them
  // whose mass reaches top_p. Scratch per thread: this runs once per sampled row.
  thread_local std::vector<int32_t> order;
  thread_local std::vector<float> kept_p;
  order.resize(out.size());
  std::iota(order.begin(), order.end(), 0);
  const auto before = [&](int32_t a, int32_t b) {
    return out[size_t(a)] > out[size_t(b)] || (out[size_t(a)] == out[size_t(b)] && a < b);
  };
  size_t keep = top_k > 0 ? std::min(order.size(), size_t(top_k)) : order.size();
  std::partial_sort(order.begin(), order.begin() + long(keep), order.end(), before);
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) {
    mass += out[size_t(order[i])];
    if (mass >= top_p) {
      keep = i + 1;
      break;
    }
  }
  kept_p.resize(keep);
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += (kept_p[i] = out[size_t(order[i])]);
  std::fill(out.begin(), out.end(), 0.0f);
  for (size_t i = 0; i < keep; ++i) out[size_t(order[i])] = float(kept_p[i] / kept);
}

std::vector<float> distribution(std::span<const float> logits, float temperature, float top_p, int top_k) {
  std::vector<float> p(logits.size());
  distribution(logits, temperature, top_p, top_k, p);
  return p;
}

int32_t sample(std::span<const float> probs, double u) {
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

Acceptance accept_or_resample(std::span<const float> p, std::span<const float> q, int32_t draft, double u_accept,
                              double u_residual) {
  check(p.size() == q.size() && draft >= 0 && size_t(draft) < p.size(),
        "accept_or_resample: draft {} with distributions of {} and {} tokens", draft, p.size(), q.size());
  const float pd = p[size_t(draft)], qd = q[size_t(draft)];
  if (qd > 0 && u_accept < std::min(1.0, double(pd) / double(qd))) return {true, draft};
  thread_local std::vector<float> residual;
  residual.resize(p.size());
  double sum = 0;
  for (size_t i = 0; i < p.size(); ++i) sum += (residual[i] = std::max(0.0f, p[i] - q[i]));
  if (sum <= 0) return {false, sample(p, u_residual)};  // p == q: never reached with u < 1, kept for safety
  for (auto& v : residual) v = float(v / sum);
  return {false, sample(residual, u_residual)};
}

}  // namespace ballast::kernels
