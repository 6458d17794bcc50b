#pragma once
// Synthetic routing workloads: per-layer expert popularity (log-normal or Zipf), drift of the
// popularity over time (a random walk of log-popularity, plus a steady trend: log-popularity moving
// along one random direction at a constant rate), per-pass burstiness (a log-normal
// jitter of the popularity for one pass) and sampling noise: a pass is one decode step of a large
// EP deployment, `tokens` tokens (the global batch) x top-k choices drawn as a multinomial from
// the pass's popularity. Deterministic in the seed; each layer has its own stream so layers can be made
// one at a time.
#include "ballast/eplb/load.h"

#include <cstdint>
#include <string>
#include <vector>

namespace ballast::eplb {

enum class Popularity { lognormal, zipf };

struct SynthSpec {
  std::string name = "custom";
  int layers = 48, experts = 512, topk = 10;
  int passes = 1000;
  int tokens = 16384;       // tokens per pass (the global batch of all EP ranks together)
  Popularity popularity = Popularity::lognormal;
  double skew = 1.0;        // log-normal sigma, or Zipf exponent
  double drift = 0.1;       // std of the log-popularity change over 1000 passes (random walk)
  // Steady drift: log-popularity of expert e moves by trend * d_e every 1000 passes, d a random
  // direction (d_e ~ N(0, 1), one per layer): some experts rise, others fall, all the time.
  double trend = 0.0;
  double burst = 0.05;      // std of the per-pass log-popularity jitter
  uint64_t seed = 1;
};

// Model shapes: "qwen3-next" (48 x 512, top-10), "qwen3.5-397b" (60 x 512, top-10),
// "deepseek-v3" (58 x 256, top-8).
SynthSpec model_shape(const std::string& model);
Popularity parse_popularity(const std::string& name);

// Counts [T][E] of one layer (row stride E).
std::vector<double> synth_layer(const SynthSpec& spec, int layer);
// The whole trace [T][L][E].
LoadTrace synth_trace(const SynthSpec& spec);

}  // namespace ballast::eplb
