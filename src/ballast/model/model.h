#pragma once
// The Qwen3-Next / Qwen3.5-MoE text model: embed -> decoder layers (Gated DeltaNet or gated
// attention mixer, then a sparse MoE or dense FFN) -> final norm -> lm_head. Written against
// kernels::Ops only; routed experts go through a moe::MoeRunner (local or expert-parallel).
#include <memory>
#include <span>

#include "ballast/kernels/ops.h"
#include "ballast/model/config.h"
#include "ballast/model/sequence_state.h"
#include "ballast/model/weights.h"
#include "ballast/moe/moe_runner.h"

namespace ballast::model {

// One sequence's share of a forward pass: new tokens appended after state->length.
struct SeqChunk {
  SequenceState* state = nullptr;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // logits for every token (else only the last one)
  bool keep_states = false;  // keep DeltaNet states after every token (see Model::roll_back)
};

// One sequence's share of an MTP pass: pairs (hidden[i], tokens[i]) at positions
// position + i, appended to the MTP layer's own cache. hidden is the trunk's state after
// model.norm, or, when chaining drafts, the MTP head's previous output after mtp.norm.
struct MtpChunk {
  SequenceState* state = nullptr;  // from Model::new_mtp_sequence
  std::span<const int32_t> tokens;
  Tensor hidden;  // [n, H]
  int64_t position = 0;
  bool all_logits = false;
};

struct ForwardResult {
  Tensor logits;  // [rows, V]
  Tensor hidden;  // [rows, H] after the final norm (the MTP head's input)
  std::vector<int64_t> first_row;  // per chunk, its first row in logits/hidden
};

class Model {
 public:
  Model(ModelConfig cfg, ModelWeights weights, kernels::Ops& ops, moe::MoeRunner& trunk_moe);

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }

  SequenceState new_sequence(int64_t capacity) const;

  // Routed experts of the trunk's MoE layers go through `runner` from now on (expert parallelism).
  void set_trunk_moe(moe::MoeRunner& runner) { trunk_moe_ = &runner; }

  bool has_mtp() const { return w_.mtp.has_value(); }
  SequenceState new_mtp_sequence(int64_t capacity) const;
  void set_mtp_moe(moe::MoeRunner& runner) { mtp_moe_ = &runner; }
  // One MTP pass (spec/MODEL.md): logits of the token after next, and the head's output after
  // mtp.norm (the hidden input of a chained draft step).
  ForwardResult mtp_forward(std::span<const MtpChunk> chunks);

  // Keeps the first `accepted` tokens of the state's last keep_states chunk: later KV rows are
  // dropped (by length) and DeltaNet states restored to their value after token accepted - 1.
  void roll_back(SequenceState& state, int64_t accepted) const;

  // Runs all chunks in one pass (prefill and decode mixed); advances each state. No chunks is a
  // valid pass under expert parallelism: the rank still serves its experts to the others.
  ForwardResult forward(std::span<const SeqChunk> chunks);

  // One decoder layer over x[T, H] (rows of `chunks` in order), in place. Shared with the MTP head.
  void decoder_layer(const LayerWeights& lw, int layer_state, int moe_layer, moe::MoeRunner& runner,
                     std::span<const SeqChunk> chunks, std::span<const int32_t> positions, Tensor& x);

 private:
  void attention(const AttentionWeights& w, int layer_state, std::span<const SeqChunk> chunks,
                 std::span<const int32_t> positions, const Tensor& h, Tensor& out);
  void deltanet(const DeltaNetWeights& w, int layer_state, std::span<const SeqChunk> chunks, const Tensor& h,
                Tensor& out);
  void sparse_moe(const MoeWeights& w, int moe_layer, moe::MoeRunner& runner, const Tensor& h, Tensor& out);
  SequenceState new_state(std::span<const LayerType> types, int64_t capacity) const;
  // `norm` and lm_head over the rows of x (chunks of `lengths` rows) that ask for logits: all of
  // a chunk's rows, or its last.
  ForwardResult project(const Tensor& x, std::span<const int64_t> lengths, const std::vector<bool>& all_logits,
                        const Tensor& norm);

  ModelConfig cfg_;
  ModelWeights w_;
  kernels::Ops& ops_;
  moe::MoeRunner* trunk_moe_;
  moe::MoeRunner* mtp_moe_;
  std::vector<int> moe_index_;  // layer -> index among MoE layers (-1 for dense)
};

}  // namespace ballast::model
