#pragma once
// The math of drawing tokens, shared by every backend's sample and verify_drafts ops (and by their
// tests): the processed distribution (temperature, top-k, top-p), draws by inverse CDF from a
// counter-based uniform, and the acceptance step of speculative sampling (Leviathan et al. /
// Chen et al.), which keeps the output distributed exactly as the target model's.
//
// The uniform of a draw is a hash of (seed, position, stream): a sequence's draws depend on its
// seed and its own positions only, never on the batch around it, and a GPU computes the same
// values as the CPU.
#include <cstdint>
#include <span>
#include <vector>

#include "ballast/core/hash.h"
#include "ballast/kernels/ops.h"

namespace ballast::kernels {

// A uniform in [0, 1) with 53 random bits.
constexpr double uniform(uint64_t seed, int32_t position, Draw stream) {
  const uint64_t h = mix64(mix64(seed) ^ mix64((uint64_t(uint32_t(position)) << 8) | uint64_t(stream)));
  return double(h >> 11) * 0x1.0p-53;
}

// Index of the largest value; ties go to the lowest index (as torch.argmax).
int32_t argmax(std::span<const float> logits);

// The distribution a token is drawn from: softmax(logits / temperature) restricted to the top_k
// most likely tokens (0: all; ties to the lower id), then to the smallest prefix of them whose
// mass reaches top_p, renormalised. temperature <= 0: all mass on the argmax. out.size() == V.
void distribution(std::span<const float> logits, float temperature, float top_p, int top_k, std::span<float> out);
std::vector<float> distribution(std::span<const float> logits, float temperature, float top_p, int top_k);

// The token whose cumulative probability first exceeds u (probs sum to 1; tokens of zero
// probability are never returned).
int32_t sample(std::span<const float> probs, double u);

// One drafted token drawn from q, checked against p: accepted when u_accept < p(draft) / q(draft);
// otherwise the token is drawn with u_residual from normalise(max(0, p - q)).
struct Acceptance {
  bool accepted;
  int32_t token;  // the draft if accepted, else the correction
};
Acceptance accept_or_resample(std::span<const float> p, std::span<const float> q, int32_t draft, double u_accept,
                              double u_residual);

}  // namespace ballast::kernels
