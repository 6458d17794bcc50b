#pragma once
// One forward pass as data on the device: the rows (tokens) of every sequence in it, where their
// caches live, which rows produce logits, and (MTP passes) which hidden state each row pairs
// with. runtime/ builds it on the host and uploads it in one copy; the model reads it only
// through ops, so a pass needs no host decision and can be captured as a CUDA graph.
#include <vector>

#include "ballast/core/tensor.h"
#include "ballast/kernels/ops.h"

namespace ballast::model {

struct ForwardBatch {
  kernels::SeqLayout layout;  // T rows over B sequences, and their caches
  Tensor token_ids;           // [T] I32
  Tensor positions;           // [T] I32, RoPE positions
  Tensor logit_rows;          // [R] I32: the rows whose logits the pass computes, in output order
  Tensor hidden_rows;         // [T] I32, MTP passes: the row of the hidden-state source each row pairs with
  Tensor routed;              // [T] I32 or undefined (every row): 0 for a row that only fills a graph's
                              // shape, which goes to no expert (no expert's weights read for it, no
                              // load recorded), 1 for the others
  int num_tokens() const { return layout.num_tokens; }
  int num_logit_rows() const { return logit_rows.defined() ? int(logit_rows.dim(0)) : 0; }
};

// One layer's cache as the ops see it: paged K/V for a full-attention layer, the conv and
// recurrent state pools for a Gated DeltaNet layer (runtime::StateCache owns the memory).
struct LayerCache {
  Tensor k, v;       // [blocks, block_size, Hkv, hd]
  Tensor conv, ssm;  // [slots, conv_dim, kc - 1], [slots, Hv, dk, dv]
};

struct CacheViews {
  std::vector<LayerCache> layers;      // [num_layers]
  std::vector<LayerCache> mtp_layers;  // [MTP layers] (full attention), empty without MTP
};

// Where a pass's results go (device tensors owned by the caller).
struct ForwardOutputs {
  Tensor hidden;  // trunk: [T, H], every row after model.norm; MTP: [R, H], the logit rows after mtp.norm
  Tensor logits;  // [R, V]
};

}  // namespace ballast::model
