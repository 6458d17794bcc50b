#pragma once
// Per-sequence decoding state: a KV cache for each full-attention layer, conv and recurrent
// state for each Gated DeltaNet layer, and the number of tokens already consumed.
#include <vector>

#include "ballast/core/tensor.h"

namespace ballast::model {

struct LayerState {
  Tensor k, v;       // full attention: [capacity, Hkv, hd]
  Tensor conv, ssm;  // DeltaNet: conv [conv_dim, kc - 1], recurrent [Hv, dk, dv]
};

struct SequenceState {
  std::vector<LayerState> layers;
  int64_t length = 0;    // tokens consumed (the next token's position)
  int64_t capacity = 0;  // KV rows allocated
};

}  // namespace ballast::model
