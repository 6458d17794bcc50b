#pragma once
// The Qwen3-Next / Qwen3.5-MoE text model (docs/model.md): embed -> decoder layers (Gated
// DeltaNet or gated attention mixer, then a sparse MoE or dense FFN) -> final norm -> lm_head,
// and the MTP head. Written against kernels::Ops only, over a ForwardBatch: the model never sees
// a backend, a sequence or a host decision. Routed experts go through a moe::MoeRunner (every
// expert here, or expert-parallel across ranks).
#include <span>

#include "ballast/kernels/ops.h"
#include "ballast/kernels/workspace.h"
#include "ballast/model/batch.h"
#include "ballast/model/config.h"
#include "ballast/model/weights.h"
#include "ballast/moe/moe_runner.h"

namespace ballast::model {

class Model {
 public:
  // `weights` as the device reads them (Backend::to_device); the trunk's and the MTP head's
  // routed experts start with `moe` and can be rewired with set_*_moe.
  Model(ModelConfig cfg, ModelWeights weights, kernels::Ops& ops, moe::MoeRunner& moe);

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  bool has_mtp() const { return w_.mtp.has_value(); }

  void set_trunk_moe(moe::MoeRunner& runner) { trunk_moe_ = &runner; }
  void set_mtp_moe(moe::MoeRunner& runner) { mtp_moe_ = &runner; }

  // One trunk pass: appends every row to its sequence's cache, writes every row's final hidden
  // state (after model.norm) to out.hidden [T, H] and the logits of batch.logit_rows to out.logits.
  void forward(const ForwardBatch& batch, const CacheViews& cache, kernels::Workspace& ws, ForwardOutputs& out);

  // One MTP pass (docs/model.md, MTP head): row t pairs token_ids[t] with hidden_in[hidden_rows[t]]
  // (the trunk's state after model.norm, or the head's own previous output when chaining),
  // appends to the MTP layer's cache, and writes for the logit rows their output after mtp.norm
  // (out.hidden [R, H], the input of a chained step) and the logits of the token after next.
  void mtp_forward(const ForwardBatch& batch, const Tensor& hidden_in, const CacheViews& cache, kernels::Workspace& ws,
                   ForwardOutputs& out);

 private:
  // One layer over the residual stream x: its mixer reads `in` (its input norm, finished or left
  // pending by the layer before), and it ends with `then` (x += its MLP's output in ffn, and the
  // next norm: the next layer's input norm, the final norm or the MTP head's), which it returns as
  // its last op left it.
  kernels::PendingNorm decoder_layer(const LayerWeights& lw, const LayerCache& cache, int moe_layer,
                                     moe::MoeRunner& runner, const ForwardBatch& batch, kernels::Workspace& ws,
                                     Tensor& x, const kernels::PendingNorm& in, const kernels::AddNorm& then,
                                     Tensor& ffn);
  // The mixers return their output before its projection (o [T, *]; the projection is the layer's,
  // in the op that adds it to the residual stream: MixerOut).
  Tensor attention(const AttentionWeights& w, const LayerCache& cache, const ForwardBatch& batch,
                   const kernels::PendingNorm& in, kernels::Workspace& ws);
  Tensor deltanet(const DeltaNetWeights& w, const LayerCache& cache, const ForwardBatch& batch,
                  const kernels::PendingNorm& in, kernels::Workspace& ws);
  // A mixer's output o, its projection and the norm after it: the FFN's first projections take
  // h = rms_norm(x + o @ w_out^T, norm) as the op that adds the projection into x leaves it
  // (project_after; d: the projection, then the pending norm; sums: its partial sums).
  struct MixerOut {
    Tensor o;
    const Tensor& w_out;
    const Tensor& norm;
    Tensor d, sums;
  };
  // x += m.o @ m.w_out^T, h = rms_norm(x, m.norm), y[i] = h @ w[i]^T.
  void project_after(const MixerOut& m, Tensor& x, Tensor& h, std::span<const Tensor> w, std::span<Tensor> y);
  // routed: the batch's (rows that only pad a graph go to no expert). Ends with `then`.
  kernels::PendingNorm sparse_moe(const MoeWeights& w, int moe_layer, moe::MoeRunner& runner, const Tensor& routed,
                                  const MixerOut& m, Tensor& x, Tensor& h, kernels::Workspace& ws, Tensor& out,
                                  const kernels::AddNorm& then);
  // out[T, H] = down(silu(gate h) * up h): the dense MLP.
  void swiglu(const kernels::SwigluWeights& w, const MixerOut& m, Tensor& x, Tensor& h, kernels::Workspace& ws,
              Tensor& out);

  ModelConfig cfg_;
  ModelWeights w_;
  kernels::Ops& ops_;
  moe::MoeRunner* trunk_moe_;
  moe::MoeRunner* mtp_moe_;
  std::vector<int> moe_index_;  // layer -> index among the trunk's MoE layers (-1 for dense)
};

}  // namespace ballast::model
