#include "ballast/model/model.h"

#include <vector>

#include "ballast/core/error.h"
#include "ballast/moe/local_experts.h"

namespace ballast::model {

Model::Model(ModelConfig cfg, ModelWeights weights, kernels::Ops& ops, moe::MoeRunner& trunk_moe)
    : cfg_(std::move(cfg)), w_(std::move(weights)), ops_(ops), trunk_moe_(&trunk_moe), mtp_moe_(&trunk_moe) {
  int m = 0;
  for (auto f : cfg_.ffn_types) moe_index_.push_back(f == FfnType::Moe ? m++ : -1);
}

SequenceState Model::new_sequence(int64_t capacity) const { return new_state(cfg_.layer_types, capacity); }

SequenceState Model::new_mtp_sequence(int64_t capacity) const {
  check(has_mtp(), "the model has no MTP head (no mtp.* tensors)");
  const std::vector<LayerType> types(w_.mtp->layers.size(), LayerType::FullAttention);
  return new_state(types, capacity);
}

SequenceState Model::new_state(std::span<const LayerType> types, int64_t capacity) const {
  SequenceState s;
  s.capacity = capacity;
  const int64_t kd = int64_t(cfg_.linear_num_key_heads) * cfg_.linear_key_head_dim;
  const int64_t conv_dim = 2 * kd + int64_t(cfg_.linear_num_value_heads) * cfg_.linear_value_head_dim;
  for (auto type : types) {
    LayerState ls;
    if (type == LayerType::FullAttention) {
      ls.k = ops_.alloc({capacity, cfg_.num_kv_heads, cfg_.head_dim});
      ls.v = ops_.alloc({capacity, cfg_.num_kv_heads, cfg_.head_dim});
    } else {
      ls.conv = ops_.alloc({conv_dim, cfg_.linear_conv_kernel_dim - 1});
      ls.ssm = ops_.alloc({cfg_.linear_num_value_heads, cfg_.linear_key_head_dim, cfg_.linear_value_head_dim});
    }
    s.layers.push_back(std::move(ls));
  }
  return s;
}

ForwardResult Model::forward(std::span<const SeqChunk> chunks) {
  const int64_t H = cfg_.hidden_size;
  std::vector<int32_t> ids, positions;
  std::vector<int64_t> lengths;
  std::vector<bool> all;
  for (const auto& c : chunks) {
    check(c.state && !c.tokens.empty(), "forward: empty chunk");
    check(c.state->length + int64_t(c.tokens.size()) <= c.state->capacity,
          "sequence of {} tokens exceeds its cache capacity of {}", c.state->length + c.tokens.size(),
          c.state->capacity);
    for (size_t i = 0; i < c.tokens.size(); ++i) {
      ids.push_back(c.tokens[i]);
      positions.push_back(int32_t(c.state->length + int64_t(i)));
    }
    lengths.push_back(int64_t(c.tokens.size()));
    all.push_back(c.all_logits);
  }
  Tensor x = ops_.alloc({int64_t(ids.size()), H});
  ops_.embedding(ids, w_.embed, x);
  for (int l = 0; l < cfg_.num_layers; ++l) decoder_layer(w_.layers[l], l, moe_index_[l], *trunk_moe_, chunks, positions, x);
  for (const auto& c : chunks) {
    c.state->length += int64_t(c.tokens.size());
    c.state->kept = c.keep_states ? int64_t(c.tokens.size()) : 0;
  }
  return project(x, lengths, all, w_.final_norm);
}

ForwardResult Model::mtp_forward(std::span<const MtpChunk> chunks) {
  check(has_mtp(), "the model has no MTP head (no mtp.* tensors)");
  const MtpWeights& m = *w_.mtp;
  const int64_t H = cfg_.hidden_size;
  std::vector<int32_t> ids, positions;
  std::vector<int64_t> lengths;
  std::vector<bool> all;
  std::vector<SeqChunk> seq;  // the same chunks as the decoder layer sees them
  for (const auto& c : chunks) {
    const int64_t n = int64_t(c.tokens.size());
    check(c.state && n > 0 && c.hidden.dim(0) == n && c.hidden.dim(1) == H, "mtp_forward: chunk of {} tokens, hidden {}",
          n, c.hidden);
    check(c.state->length + n <= c.state->capacity, "MTP cache of {} entries exceeded", c.state->capacity);
    for (int64_t i = 0; i < n; ++i) {
      ids.push_back(c.tokens[size_t(i)]);
      positions.push_back(int32_t(c.position + i));
    }
    lengths.push_back(n);
    all.push_back(c.all_logits);
    seq.push_back({c.state, c.tokens, c.all_logits});
  }
  const int64_t T = int64_t(ids.size());
  Tensor emb = ops_.alloc({T, H}), hid = ops_.alloc({T, H});
  ops_.embedding(ids, w_.embed, emb);
  ops_.rms_norm(emb, m.norm_embedding, cfg_.rms_norm_eps, emb);
  int64_t row = 0;
  for (const auto& c : chunks) {
    Tensor dst = hid.rows(row, row + c.hidden.dim(0));
    ops_.copy(c.hidden, dst);
    row += c.hidden.dim(0);
  }
  ops_.rms_norm(hid, m.norm_hidden, cfg_.rms_norm_eps, hid);
  Tensor cat = ops_.alloc({T, 2 * H});
  ops_.concat_cols(emb, hid, cat);  // embedding first
  Tensor u = ops_.alloc({T, H});
  ops_.matmul(cat, m.fc, u);
  // Released checkpoints have one MTP layer; deeper heads would chain their layers per step.
  decoder_layer(m.layers[0], 0, 0, *mtp_moe_, seq, positions, u);
  for (const auto& c : chunks) c.state->length += int64_t(c.tokens.size());
  return project(u, lengths, all, m.norm);
}

ForwardResult Model::project(const Tensor& x, std::span<const int64_t> lengths, const std::vector<bool>& all_logits,
                             const Tensor& norm) {
  ForwardResult r;
  std::vector<int32_t> rows;
  int64_t offset = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    r.first_row.push_back(int64_t(rows.size()));
    for (int64_t t = all_logits[i] ? 0 : lengths[i] - 1; t < lengths[i]; ++t) rows.push_back(int32_t(offset + t));
    offset += lengths[i];
  }
  const int64_t R = int64_t(rows.size());
  r.hidden = ops_.alloc({R, cfg_.hidden_size});
  ops_.gather_rows(x, rows, r.hidden);
  ops_.rms_norm(r.hidden, norm, cfg_.rms_norm_eps, r.hidden);
  r.logits = ops_.alloc({R, cfg_.vocab_size});
  ops_.matmul(r.hidden, w_.lm_head, r.logits);
  return r;
}

void Model::roll_back(SequenceState& state, int64_t accepted) const {
  check(accepted >= 1 && accepted <= state.kept, "roll_back: {} tokens accepted of a chunk of {}", accepted, state.kept);
  state.length -= state.kept - accepted;
  for (auto& ls : state.layers)
    if (!ls.conv_after.empty()) {
      ops_.copy(ls.conv_after[size_t(accepted - 1)], ls.conv);
      ops_.copy(ls.ssm_after[size_t(accepted - 1)], ls.ssm);
    }
  state.kept = 0;
}

void Model::decoder_layer(const LayerWeights& lw, int layer_state, int moe_layer, moe::MoeRunner& runner,
                          std::span<const SeqChunk> chunks, std::span<const int32_t> positions, Tensor& x) {
  const int64_t T = x.dim(0), H = cfg_.hidden_size;
  Tensor h = ops_.alloc({T, H});
  Tensor mixed = ops_.alloc({T, H});
  ops_.rms_norm(x, lw.input_norm, cfg_.rms_norm_eps, h);
  if (lw.type == LayerType::FullAttention) attention(lw.attn, layer_state, chunks, positions, h, mixed);
  else deltanet(lw.delta, layer_state, chunks, h, mixed);
  ops_.add(x, mixed);

  ops_.rms_norm(x, lw.post_norm, cfg_.rms_norm_eps, h);
  Tensor ffn = ops_.alloc({T, H});
  if (lw.ffn == FfnType::Moe) sparse_moe(lw.moe, moe_layer, runner, h, ffn);
  else moe::run_dense(ops_, lw.dense, h, ffn);
  ops_.add(x, ffn);
}

void Model::attention(const AttentionWeights& w, int layer_state, std::span<const SeqChunk> chunks,
                      std::span<const int32_t> positions, const Tensor& h, Tensor& out) {
  const int64_t T = h.dim(0), Hq = cfg_.num_heads, Hkv = cfg_.num_kv_heads, hd = cfg_.head_dim;
  Tensor qg = ops_.alloc({T, Hq, 2 * hd});
  Tensor q = ops_.alloc({T, Hq, hd}), gate = ops_.alloc({T, Hq, hd});
  Tensor k = ops_.alloc({T, Hkv, hd}), v = ops_.alloc({T, Hkv, hd});
  Tensor qg2 = qg.reshape({T, Hq * 2 * hd});
  ops_.matmul(h, w.q_proj, qg2);
  ops_.split_heads_gate(qg, q, gate);
  Tensor k2 = k.reshape({T, Hkv * hd}), v2 = v.reshape({T, Hkv * hd});
  ops_.matmul(h, w.k_proj, k2);
  ops_.matmul(h, w.v_proj, v2);
  ops_.rms_norm(q, w.q_norm, cfg_.rms_norm_eps, q);
  ops_.rms_norm(k, w.k_norm, cfg_.rms_norm_eps, k);
  ops_.rope(q, positions, cfg_.rotary_dim(), cfg_.rope_theta);
  ops_.rope(k, positions, cfg_.rotary_dim(), cfg_.rope_theta);

  Tensor o = ops_.alloc({T, Hq, hd});
  int64_t row = 0;
  for (const auto& c : chunks) {
    const int64_t n = int64_t(c.tokens.size());
    LayerState& st = c.state->layers[layer_state];
    Tensor oc = o.rows(row, row + n);
    ops_.attention(q.rows(row, row + n), k.rows(row, row + n), v.rows(row, row + n), st.k, st.v, c.state->length, oc);
    row += n;
  }
  ops_.mul_sigmoid(o, gate);
  ops_.matmul(o.reshape({T, Hq * hd}), w.o_proj, out);
}

void Model::deltanet(const DeltaNetWeights& w, int layer_state, std::span<const SeqChunk> chunks, const Tensor& h,
                     Tensor& out) {
  const int64_t T = h.dim(0);
  const kernels::DeltaRuleDims d{cfg_.linear_num_key_heads, cfg_.linear_num_value_heads, cfg_.linear_key_head_dim,
                                 cfg_.linear_value_head_dim};
  const int64_t conv_dim = 2 * int64_t(d.Hk) * d.dk + int64_t(d.Hv) * d.dv, vd = int64_t(d.Hv) * d.dv;
  Tensor qkv = ops_.alloc({T, conv_dim}), z = ops_.alloc({T, vd});
  Tensor b = ops_.alloc({T, d.Hv}), a = ops_.alloc({T, d.Hv});
  ops_.matmul(h, w.in_qkv, qkv);
  ops_.matmul(h, w.in_z, z);
  ops_.matmul(h, w.in_b, b);
  ops_.matmul(h, w.in_a, a);
  Tensor beta = ops_.alloc({T, d.Hv}), g = ops_.alloc({T, d.Hv});
  ops_.delta_gates(b, a, w.A_log, w.dt_bias, beta, g);

  Tensor conv_out = ops_.alloc({T, conv_dim});
  Tensor o = ops_.alloc({T, vd});
  int64_t row = 0;
  for (const auto& c : chunks) {
    const int64_t n = int64_t(c.tokens.size());
    LayerState& st = c.state->layers[layer_state];
    if (c.keep_states) {
      // Verification of drafted tokens: one step at a time, keeping the states after each token.
      st.conv_after.resize(size_t(n));
      st.ssm_after.resize(size_t(n));
      for (int64_t i = row; i < row + n; ++i) {
        Tensor co = conv_out.rows(i, i + 1), oc = o.rows(i, i + 1);
        ops_.causal_conv1d_silu(qkv.rows(i, i + 1), w.conv, st.conv, co);
        ops_.gated_delta_rule(co, g.rows(i, i + 1), beta.rows(i, i + 1), d, st.ssm, oc, false);
        auto& ca = st.conv_after[size_t(i - row)];
        auto& sa = st.ssm_after[size_t(i - row)];
        if (!ca.defined()) ca = ops_.alloc(st.conv.shape()), sa = ops_.alloc(st.ssm.shape());
        ops_.copy(st.conv, ca);
        ops_.copy(st.ssm, sa);
      }
    } else {
      Tensor co = conv_out.rows(row, row + n), oc = o.rows(row, row + n);
      ops_.causal_conv1d_silu(qkv.rows(row, row + n), w.conv, st.conv, co);
      // Prefill takes the chunked (WY) form, decode the recurrence; they compute the same function.
      ops_.gated_delta_rule(co, g.rows(row, row + n), beta.rows(row, row + n), d, st.ssm, oc, n > 1);
    }
    row += n;
  }
  Tensor on = o.reshape({T * d.Hv, d.dv});
  ops_.gated_rms_norm(on, z.reshape({T * d.Hv, d.dv}), w.norm, cfg_.rms_norm_eps, on);
  ops_.matmul(o, w.out_proj, out);
}

void Model::sparse_moe(const MoeWeights& w, int moe_layer, moe::MoeRunner& runner, const Tensor& h, Tensor& out) {
  const int64_t T = h.dim(0);
  const int E = cfg_.num_experts;
  Tensor logits = ops_.alloc({T, E});
  ops_.matmul(h, w.router, logits);
  std::vector<float> host(size_t(T * E));
  ops_.to_host(logits, host.data());
  const moe::Routing routing = moe::route_topk(host.data(), T, E, cfg_.num_experts_per_tok, cfg_.norm_topk_prob);
  if (w.shared) {
    moe::run_dense(ops_, *w.shared, h, out);
    Tensor s = ops_.alloc({T, 1});
    ops_.matmul(h, w.shared_gate, s);
    ops_.scale_rows_sigmoid(out, s);
  }
  runner.run(ops_, moe_layer, h, routing, w.experts, out);
}

}  // namespace ballast::model
