#pragma once
// Parameter counts and memory sizes that follow from a ModelConfig alone (what `ballast
// inspect` prints and what a checkpoint's tensor sizes are checked against).
#include <cstdint>

#include "ballast/model/config.h"

namespace ballast::model {

struct ParamCounts {
  int64_t embedding = 0;       // embed_tokens [V, H]
  int64_t lm_head = 0;         // [V, H]; 0 when tied to the embedding
  int64_t norms = 0;           // per-layer input/post norms + model.norm
  int64_t attention = 0;       // all full-attention mixers (projections, q/k norms)
  int64_t deltanet = 0;        // all Gated DeltaNet mixers
  int64_t dense_mlp = 0;       // dense SwiGLU layers
  int64_t router = 0;          // mlp.gate + mlp.shared_expert_gate
  int64_t routed_experts = 0;  // every routed expert of every MoE layer
  int64_t shared_experts = 0;
  int64_t routed_active = 0;   // the k of E experts a token visits, summed over MoE layers
  int64_t mtp = 0;             // the MTP head (fc, its norms, its decoder layers)
  int64_t mtp_active = 0;      // the MTP head with k of E experts per layer

  // The trunk (everything but the MTP head).
  int64_t total() const {
    return embedding + lm_head + norms + attention + deltanet + dense_mlp + router + routed_experts +
           shared_experts;
  }
  // Parameters one token touches in the trunk: all of it except the routed experts it skips.
  int64_t active_per_token() const { return total() - routed_experts + routed_active; }
};

ParamCounts count_parameters(const ModelConfig& c);

// Parameters of one layer's pieces, exposed for tests and for the MTP count.
int64_t attention_params(const ModelConfig& c);
int64_t deltanet_params(const ModelConfig& c);
int64_t moe_params(const ModelConfig& c, bool active_only);  // router + experts + shared

// KV cache bytes per token of one sequence, trunk only (MTP layers add mtp_kv_bytes_per_token).
int64_t kv_bytes_per_token(const ModelConfig& c, int64_t bytes_per_element);
int64_t mtp_kv_bytes_per_token(const ModelConfig& c, int64_t bytes_per_element);
// Gated DeltaNet state bytes per sequence: the recurrent states S [Hv, dk, dv] in fp32 and the
// conv states [conv_dim, kc-1] at conv_bytes_per_element, over all linear-attention layers.
int64_t deltanet_state_bytes(const ModelConfig& c, int64_t conv_bytes_per_element = 4);

}  // namespace ballast::model
