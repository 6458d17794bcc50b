#include "ballast/model/param_count.h"

namespace ballast::model {

int64_t attention_params(const ModelConfig& c) {
  const int64_t H = c.hidden_size, hd = c.head_dim, q = int64_t(c.num_heads) * hd,
                kv = int64_t(c.num_kv_heads) * hd;
  // q_proj carries [q | gate] per head, hence 2q rows.
  return H * 2 * q + 2 * H * kv + q * H + 2 * hd;
}

int64_t deltanet_params(const ModelConfig& c) {
  const int64_t H = c.hidden_size, Hv = c.linear_num_value_heads;
  const int64_t key_dim = int64_t(c.linear_num_key_heads) * c.linear_key_head_dim;
  const int64_t value_dim = Hv * c.linear_value_head_dim;
  const int64_t conv_dim = 2 * key_dim + value_dim;
  // in_proj_qkvz + in_proj_ba (or the unpacked qkv, z, b, a: the same count), conv1d, A_log,
  // dt_bias, the gated norm over dv, out_proj.
  return H * (2 * key_dim + 2 * value_dim) + H * 2 * Hv + conv_dim * c.linear_conv_kernel_dim + 2 * Hv +
         c.linear_value_head_dim + value_dim * H;
}

int64_t moe_params(const ModelConfig& c, bool active_only) {
  const int64_t H = c.hidden_size;
  const int64_t experts = active_only ? c.num_experts_per_tok : c.num_experts;
  const int64_t Is = c.shared_expert_intermediate_size;
  return int64_t(c.num_experts) * H + experts * 3 * H * c.moe_intermediate_size +
         (Is > 0 ? 3 * H * Is + H : 0);
}

ParamCounts count_parameters(const ModelConfig& c) {
  ParamCounts p;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  p.embedding = V * H;
  p.lm_head = c.tie_word_embeddings ? 0 : V * H;
  p.norms = 2 * H * c.num_layers + H;
  const int64_t Is = c.shared_expert_intermediate_size;
  const int64_t expert = 3 * H * c.moe_intermediate_size;
  for (int i = 0; i < c.num_layers; ++i) {
    if (c.layer_types[size_t(i)] == LayerType::FullAttention) p.attention += attention_params(c);
    else p.deltanet += deltanet_params(c);
    if (c.ffn_types[size_t(i)] == FfnType::Dense) {
      p.dense_mlp += 3 * H * c.intermediate_size;
    } else {
      p.router += int64_t(c.num_experts) * H + (Is > 0 ? H : 0);
      p.routed_experts += c.num_experts * expert;
      p.routed_active += c.num_experts_per_tok * expert;
      p.shared_experts += Is > 0 ? 3 * H * Is : 0;
    }
  }
  // MTP: fc [H, 2H], pre_fc_norm_embedding, pre_fc_norm_hidden, norm, then full-attention
  // decoder layers with their own MoE.
  if (c.mtp_num_hidden_layers > 0) {
    const int64_t head = 2 * H * H + 3 * H;
    const int64_t layer = attention_params(c) + 2 * H;
    p.mtp = head + c.mtp_num_hidden_layers * (layer + moe_params(c, false));
    p.mtp_active = head + c.mtp_num_hidden_layers * (layer + moe_params(c, true));
  }
  return p;
}

int64_t kv_bytes_per_token(const ModelConfig& c, int64_t bytes_per_element) {
  return int64_t(c.num_full_attention_layers()) * 2 * c.num_kv_heads * c.head_dim * bytes_per_element;
}

int64_t mtp_kv_bytes_per_token(const ModelConfig& c, int64_t bytes_per_element) {
  return int64_t(c.mtp_num_hidden_layers) * 2 * c.num_kv_heads * c.head_dim * bytes_per_element;
}

int64_t deltanet_state_bytes(const ModelConfig& c, int64_t conv_bytes_per_element) {
  const int64_t Hv = c.linear_num_value_heads;
  const int64_t conv_dim = 2 * int64_t(c.linear_num_key_heads) * c.linear_key_head_dim +
                           Hv * c.linear_value_head_dim;
  const int64_t per_layer = Hv * c.linear_key_head_dim * c.linear_value_head_dim * 4 +
                            conv_dim * (c.linear_conv_kernel_dim - 1) * conv_bytes_per_element;
  return per_layer * c.num_linear_attention_layers();
}

}  // namespace ballast::model
