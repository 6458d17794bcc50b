#pragma once
// Writes a randomly initialised Qwen3-Next checkpoint (config.json + model.safetensors, per-expert
// layout) for benchmarks and tests that need a model of a given size rather than a trained one.
#include <cstdint>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "ballast/core/dtype.h"

namespace ballast::model {

// A Qwen3-Next config.json of the given shape (other fields at their usual values).
struct RandomModelShape {
  int hidden = 1024, layers = 8, vocab = 32000;
  int heads = 8, kv_heads = 2, head_dim = 128;
  int key_heads = 8, value_heads = 16, key_dim = 128, value_dim = 128;
  int experts = 64, top_k = 8, moe_intermediate = 512, shared_intermediate = 512;
  int full_attention_interval = 4;
  bool qwen35 = false;  // a Qwen3_5MoeForCausalLM config (every layer MoE) instead of Qwen3-Next's
  int mtp_layers = 0;   // mtp_num_hidden_layers (random_weights makes the head; checkpoints are written without)
};
nlohmann::json random_model_config(const RandomModelShape& s);

// Writes `config` and random weights (uniform, scaled by 1/sqrt(fan_in)) to dir.
void write_random_checkpoint(const nlohmann::json& config, const std::filesystem::path& dir, uint64_t seed,
                             DType dtype = DType::BF16);

}  // namespace ballast::model
