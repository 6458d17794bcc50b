#pragma once
// The text model's configuration, read from a Hugging Face config.json of any of:
// Qwen3NextForCausalLM (model_type qwen3_next), Qwen3_5MoeForCausalLM (qwen3_5_moe_text),
// Qwen3_5MoeForConditionalGeneration (qwen3_5_moe; text fields under text_config).
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ballast/model/quantization.h"

namespace ballast::model {

enum class Family { Qwen3Next, Qwen35Moe };
enum class LayerType { LinearAttention, FullAttention };
enum class FfnType { Dense, Moe };

struct ModelConfig {
  Family family = Family::Qwen3Next;
  std::string architecture;   // as written in config.json "architectures"[0]
  std::string model_type;     // of the text part

  int vocab_size = 0;
  int hidden_size = 0;        // H
  int num_layers = 0;
  float rms_norm_eps = 1e-6f;
  bool tie_word_embeddings = false;
  int max_position_embeddings = 0;  // the longest sequence it was trained for (0: not given)

  // gated full attention
  int num_heads = 0;          // Hq
  int num_kv_heads = 0;       // Hkv
  int head_dim = 0;           // hd
  float partial_rotary_factor = 1.0f;
  double rope_theta = 10000.0;
  int rotary_dim() const { return int(head_dim * partial_rotary_factor); }

  // gated DeltaNet
  int linear_num_key_heads = 0;    // Hk
  int linear_num_value_heads = 0;  // Hv
  int linear_key_head_dim = 0;     // dk
  int linear_value_head_dim = 0;   // dv
  int linear_conv_kernel_dim = 4;  // kc

  // MoE
  int num_experts = 0;              // E
  int num_experts_per_tok = 0;      // k
  int moe_intermediate_size = 0;    // I
  int shared_expert_intermediate_size = 0;  // Is (0 = no shared expert)
  bool norm_topk_prob = true;
  int intermediate_size = 0;        // dense MLP width (Qwen3-Next dense layers)

  int mtp_num_hidden_layers = 0;

  Quantization quant;  // config.json's quantization_config (fine-grained FP8), if any

  std::vector<LayerType> layer_types;  // [num_layers]
  std::vector<FfnType> ffn_types;      // [num_layers]

  int num_full_attention_layers() const;
  int num_linear_attention_layers() const;
  int num_moe_layers() const;
};

// Parses config.json content; `source` names the file in error messages.
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& source);
// Reads and parses DIR/config.json (or the file itself if given a file).
ModelConfig load_model_config(const std::filesystem::path& dir_or_file);

}  // namespace ballast::model
