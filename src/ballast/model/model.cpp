#include "ballast/model/model.h"

#include <optional>

#include "ballast/core/error.h"

namespace ballast::model {

using kernels::Workspace;

Model::Model(ModelConfig cfg, ModelWeights weights, kernels::Ops& ops, moe::MoeRunner& moe)
    : cfg_(std::move(cfg)), w_(std::move(weights)), ops_(ops), trunk_moe_(&moe), mtp_moe_(&moe) {
  int m = 0;
  for (auto f : cfg_.ffn_types) moe_index_.push_back(f == FfnType::Moe ? m++ : -1);
}

void Model::forward(const ForwardBatch& b, const CacheViews& cache, Workspace& ws, ForwardOutputs& out) {
  const int64_t T = b.num_tokens(), H = cfg_.hidden_size;
  const int L = cfg_.num_layers;
  const float eps = cfg_.rms_norm_eps;
  check(int(cache.layers.size()) == L, "forward: caches for {} layers, the model has {}", cache.layers.size(), L);
  Tensor x = ws.take({T, H});
  ops_.embedding(b.token_ids, w_.embed, x);
  if (L == 0) {
    ops_.rms_norm(x, w_.final_norm, eps, out.hidden);
  } else {
    // Each layer ends with the next one's input norm (the last with the final norm, into out.hidden).
    Tensor ffn = ws.take({T, H}), h = ws.take({T, H}), sums = ws.take({T, ops_.norm_parts(H)});
    ops_.rms_norm(x, w_.layers[0].input_norm, eps, h);
    kernels::PendingNorm in{h, Tensor(), 0, eps};
    for (int l = 0; l < L; ++l) {
      const bool last = l + 1 == L;
      const kernels::AddNorm then{x, last ? w_.final_norm : w_.layers[size_t(l) + 1].input_norm, eps,
                                  last ? out.hidden : h, sums};
      in = decoder_layer(w_.layers[size_t(l)], cache.layers[size_t(l)], moe_index_[size_t(l)], *trunk_moe_, b, ws, x,
                         in, then, ffn);
    }
    ops_.matmul_many_normed(in, out.hidden, {}, {});
  }
  if (b.num_logit_rows() == 0) return;
  Tensor rows = ws.take({b.num_logit_rows(), H});
  ops_.gather_rows(out.hidden, b.logit_rows, 1, rows);
  ops_.matmul(rows, w_.lm_head, out.logits);
}

void Model::mtp_forward(const ForwardBatch& b, const Tensor& hidden_in, const CacheViews& cache, Workspace& ws,
                        ForwardOutputs& out) {
  check(has_mtp(), "the model has no MTP head (no mtp.* tensors)");
  const MtpWeights& m = *w_.mtp;
  const int64_t T = b.num_tokens(), H = cfg_.hidden_size;
  const float eps = cfg_.rms_norm_eps;
  Tensor emb = ws.take({T, H}), hid = ws.take({T, H});
  ops_.embedding(b.token_ids, w_.embed, emb);
  ops_.rms_norm(emb, m.norm_embedding, eps, emb);
  ops_.gather_rows(hidden_in, b.hidden_rows, 1, hid);
  ops_.rms_norm(hid, m.norm_hidden, eps, hid);
  Tensor cat = ws.take({T, 2 * H});
  ops_.concat_cols(emb, hid, cat);  // embedding first
  Tensor u = ws.take({T, H});
  ops_.matmul(cat, m.fc, u);
  // Released checkpoints have one MTP layer; deeper heads would chain their layers per step. The
  // layer ends with the head's norm (mtp.norm) over every row, of which the logit rows are kept.
  const LayerWeights& lw = m.layers[0];
  Tensor ffn = ws.take({T, H}), h = ws.take({T, H}), sums = ws.take({T, ops_.norm_parts(H)});
  ops_.rms_norm(u, lw.input_norm, eps, h);
  const kernels::PendingNorm normed =
      decoder_layer(lw, cache.mtp_layers.at(0), 0, *mtp_moe_, b, ws, u, kernels::PendingNorm{h, Tensor(), 0, eps},
                    kernels::AddNorm{u, m.norm, eps, h, sums}, ffn);
  if (b.num_logit_rows() == 0) return;
  ops_.matmul_many_normed(normed, h, {}, {});
  ops_.gather_rows(h, b.logit_rows, 1, out.hidden);
  ops_.matmul(out.hidden, w_.lm_head, out.logits);
}

kernels::PendingNorm Model::decoder_layer(const LayerWeights& lw, const LayerCache& cache, int moe_layer,
                                          moe::MoeRunner& runner, const ForwardBatch& b, Workspace& ws, Tensor& x,
                                          const kernels::PendingNorm& in, const kernels::AddNorm& then, Tensor& ffn) {
  Workspace::Scope scope(ws);  // the layer's intermediates are dead once x is updated
  const int64_t T = x.dim(0), H = cfg_.hidden_size;
  const bool attn = lw.type == LayerType::FullAttention;
  const MixerOut m{attn ? attention(lw.attn, cache, b, in, ws) : deltanet(lw.delta, cache, b, in, ws),
                   attn ? lw.attn.o_proj : lw.delta.out_proj, lw.post_norm, ws.take({T, H}),
                   then.sums};  // (the input norm's sums are spent: its products have read them)
  Tensor h = ws.take({T, H});
  if (lw.ffn == FfnType::Moe) return sparse_moe(lw.moe, moe_layer, runner, b.routed, m, x, h, ws, ffn, then);
  swiglu(lw.dense, m, x, h, ws, ffn);
  return kernels::add_norm_finished(ops_, then, ffn);
}

void Model::project_after(const MixerOut& m, Tensor& x, Tensor& h, std::span<const Tensor> w, std::span<Tensor> y) {
  Tensor d = m.d;
  const kernels::PendingNorm n = ops_.matmul_add_norm(m.o, m.w_out, d, {x, m.norm, cfg_.rms_norm_eps, h, m.sums});
  ops_.matmul_many_normed(n, h, w, y);
}

Tensor Model::attention(const AttentionWeights& w, const LayerCache& cache, const ForwardBatch& b,
                        const kernels::PendingNorm& in, Workspace& ws) {
  const int64_t T = in.s.dim(0), Hq = cfg_.num_heads, Hkv = cfg_.num_kv_heads, hd = cfg_.head_dim;
  Tensor qg = ws.take({T, Hq, 2 * hd});
  Tensor q = ws.take({T, Hq, hd}), gate = ws.take({T, Hq, hd});
  Tensor k = ws.take({T, Hkv, hd}), v = ws.take({T, Hkv, hd});
  Tensor qg2 = qg.reshape({T, Hq * 2 * hd}), k2 = k.reshape({T, Hkv * hd}), v2 = v.reshape({T, Hkv * hd});
  const Tensor proj[] = {w.q_proj, w.k_proj, w.v_proj};
  Tensor outs[] = {qg2, k2, v2}, none;
  ops_.matmul_many_normed(in, none, proj, outs);

  Tensor o = ws.take({T, Hq, hd});
  Tensor kc = cache.k, vc = cache.v;
  const kernels::QkNormRope r{w.q_norm, w.k_norm, cfg_.rms_norm_eps, b.positions, cfg_.rotary_dim(), cfg_.rope_theta};
  ops_.gated_attention(qg, r, q, gate, k, v, kc, vc, b.layout, o);
  return o.reshape({T, Hq * hd});
}

Tensor Model::deltanet(const DeltaNetWeights& w, const LayerCache& cache, const ForwardBatch& b,
                       const kernels::PendingNorm& in, Workspace& ws) {
  const int64_t T = in.s.dim(0);
  const kernels::DeltaRuleDims d{cfg_.linear_num_key_heads, cfg_.linear_num_value_heads, cfg_.linear_key_head_dim,
                                 cfg_.linear_value_head_dim};
  const int64_t conv_dim = 2 * int64_t(d.Hk) * d.dk + int64_t(d.Hv) * d.dv, vd = int64_t(d.Hv) * d.dv;
  Tensor qkv = ws.take({T, conv_dim}), z = ws.take({T, vd});
  Tensor bb = ws.take({T, d.Hv}), a = ws.take({T, d.Hv});
  const Tensor proj[] = {w.in_qkv, w.in_z, w.in_b, w.in_a};
  Tensor outs[] = {qkv, z, bb, a}, none;
  ops_.matmul_many_normed(in, none, proj, outs);
  Tensor beta = ws.take({T, d.Hv}), g = ws.take({T, d.Hv});
  ops_.delta_gates(bb, a, w.A_log, w.dt_bias, beta, g);

  Tensor conv_out = ws.take({T, conv_dim}, ops_.delta_rule_rows_dtype()), o = ws.take({T, vd});
  Tensor conv_states = cache.conv, ssm_states = cache.ssm;
  ops_.causal_conv1d_silu(qkv, w.conv, conv_states, b.layout, conv_out);
  ops_.gated_delta_rule(conv_out, g, beta, d, ssm_states, b.layout, o);
  Tensor on = o.reshape({T * d.Hv, d.dv});
  ops_.gated_rms_norm(on, z.reshape({T * d.Hv, d.dv}), w.norm, cfg_.rms_norm_eps, on);
  return o;
}

kernels::PendingNorm Model::sparse_moe(const MoeWeights& w, int moe_layer, moe::MoeRunner& runner, const Tensor& routed,
                                       const MixerOut& m, Tensor& x, Tensor& h, Workspace& ws, Tensor& out,
                                       const kernels::AddNorm& then) {
  const int64_t T = h.dim(0);
  const int E = cfg_.num_experts, k = cfg_.num_experts_per_tok;
  Tensor logits = ws.take({T, E}), ids = ws.take({T, k}, DType::I32), weights = ws.take({T, k});
  std::optional<kernels::SharedExpert> shared;
  if (w.shared) shared = kernels::SharedExpert{*w.shared, ws.take({T, 1})};
  const bool fused = shared && runner.fuses_shared(h, ids, w.experts, *shared);
  if (!shared) {
    project_after(m, x, h, std::span(&w.router, 1), std::span(&logits, 1));
    ops_.zero(out);
  } else if (fused) {
    // The shared expert in the routed experts' pass (few tokens): the router product carries only
    // the shared expert's gate beside the router, and nothing runs beside routing to be joined.
    const Tensor proj[] = {w.router, w.shared_gate};
    Tensor outs[] = {logits, shared->gate};
    project_after(m, x, h, proj, outs);
  } else {
    // The router and the shared expert's three products of h in one op.
    const int64_t I = w.shared->intermediate();
    Tensor g = ws.take({T, I}), u = ws.take({T, I});
    const Tensor proj[] = {w.router, w.shared->gate, w.shared->up, w.shared_gate};
    Tensor outs[] = {logits, g, u, shared->gate};
    project_after(m, x, h, proj, outs);
    // Beside routing and the routed experts, off the chain a decode step waits on; the runner
    // joins it before adding their rows into `out`.
    ops_.side([&] { ops_.swiglu_down(g, u, w.shared->down, shared->gate, out); });
  }
  ops_.topk_softmax(logits, k, cfg_.norm_topk_prob, routed, ids, weights);
  return runner.run_add_norm(moe_layer, h, ids, weights, w.experts, fused ? &*shared : nullptr, ws, out, then);
}

void Model::swiglu(const kernels::SwigluWeights& w, const MixerOut& m, Tensor& x, Tensor& h, Workspace& ws,
                   Tensor& out) {
  const int64_t T = h.dim(0), I = w.intermediate();
  Tensor g = ws.take({T, I}), u = ws.take({T, I});
  const Tensor proj[] = {w.gate, w.up};
  Tensor outs[] = {g, u};
  project_after(m, x, h, proj, outs);
  ops_.swiglu_down(g, u, w.down, Tensor(), out);
}

}  // namespace ballast::model
