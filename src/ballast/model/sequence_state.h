#pragma once
// Per-sequence decoding state: a KV cache for each full-attention layer, conv and recurrent
// state for each Gated DeltaNet layer, and the number of tokens already consumed.
#include <vector>

#include "ballast/core/tensor.h"

namespace ballast::model {

struct LayerState {
  Tensor k, v;       // full attention: [capacity, Hkv, hd]
  Tensor conv, ssm;  // DeltaNet: conv [conv_dim, kc - 1], recurrent [Hv, dk, dv]
  // DeltaNet states after each token of the last chunk run with keep_states (speculative
  // verification), so that the sequence can be rolled back to any accepted prefix.
  std::vector<Tensor> conv_after, ssm_after;
};

struct SequenceState {
  std::vector<LayerState> layers;
  int64_t length = 0;    // tokens consumed (the next token's position)
  int64_t capacity = 0;  // KV rows allocated
  int64_t kept = 0;      // tokens of the last keep_states chunk (0: none to roll back to)
};

}  // namespace ballast::model
