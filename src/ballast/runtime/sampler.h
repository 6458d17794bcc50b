#pragma once
// Token choice from logits: greedy, or sampling with temperature, top-k and top-p; and the
// acceptance step of speculative sampling (Leviathan et al. / Chen et al.), which keeps the output
// distributed exactly as the target model's.
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace ballast::runtime {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;
  int top_k = 0;             // 0: all
  uint64_t seed = 0;
  bool greedy() const { return temperature <= 0.0f; }
};

// The generator of the i-th sequence of a batch: each sequence has its own, so that its samples
// do not depend on what else is in the batch.
inline std::mt19937_64 sequence_rng(const SamplingParams& p, size_t i) {
  return std::mt19937_64(p.seed * 0x9e3779b97f4a7c15ULL + i);
}

// Index of the largest logit; ties go to the lowest index (as torch.argmax).
int32_t argmax(std::span<const float> logits);

// The distribution a token is drawn from: softmax(logits / T) restricted to the top-k and the
// top-p nucleus, renormalised; greedy: all mass on argmax.
std::vector<float> distribution(std::span<const float> logits, const SamplingParams& params);

// Draws an index from probabilities that sum to 1.
int32_t sample(std::span<const float> probs, std::mt19937_64& rng);

// Speculative sampling for one drafted token drawn from q: accepted with probability
// min(1, p(draft) / q(draft)); otherwise the token is drawn from normalise(max(0, p - q)).
struct Acceptance {
  bool accepted;
  int32_t token;  // the draft if accepted, else the resampled correction
};
Acceptance accept_or_resample(std::span<const float> p, std::span<const float> q, int32_t draft, std::mt19937_64& rng);

}  // namespace ballast::runtime
