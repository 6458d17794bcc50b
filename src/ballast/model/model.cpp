#include "ballast/model/model.h"

#include <vector>

#include "ballast/core/error.h"
#include "ballast/moe/local_experts.h"

namespace ballast::model {

Model::Model(ModelConfig cfg, ModelWeights weights, kernels::Ops& ops, moe::MoeRunner& trunk_moe)
    : cfg_(std::move(cfg)), w_(std::move(weights)), ops_(ops), trunk_moe_(&trunk_moe) {
  int m = 0;
  for (auto f : cfg_.ffn_types) moe_index_.push_back(f == FfnType::Moe ? m++ : -1);
}

SequenceState Model::new_sequence(int64_t capacity) const {
  SequenceState s;
  s.capacity = capacity;
  const int64_t kd = int64_t(cfg_.linear_num_key_heads) * cfg_.linear_key_head_dim;
  const int64_t conv_dim = 2 * kd + int64_t(cfg_.linear_num_value_heads) * cfg_.linear_value_head_dim;
  for (auto type : cfg_.layer_types) {
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
  for (const auto& c : chunks) {
    check(c.state && !c.tokens.empty(), "forward: empty chunk");
    check(c.state->length + int64_t(c.tokens.size()) <= c.state->capacity,
          "sequence of {} tokens exceeds its cache capacity of {}", c.state->length + c.tokens.size(),
          c.state->capacity);
    for (size_t i = 0; i < c.tokens.size(); ++i) {
      ids.push_back(c.tokens[i]);
      positions.push_back(int32_t(c.state->length + int64_t(i)));
    }
  }
  const int64_t T = int64_t(ids.size());
  Tensor x = ops_.alloc({T, H});
  ops_.embedding(ids, w_.embed, x);
  for (int l = 0; l < cfg_.num_layers; ++l) decoder_layer(w_.layers[l], l, moe_index_[l], *trunk_moe_, chunks, positions, x);

  // Rows that need logits: all of a chunk's, or its last.
  ForwardResult r;
  std::vector<int32_t> rows;
  int64_t offset = 0;
  for (const auto& c : chunks) {
    r.first_row.push_back(int64_t(rows.size()));
    const int64_t n = int64_t(c.tokens.size());
    for (int64_t i = c.all_logits ? 0 : n - 1; i < n; ++i) rows.push_back(int32_t(offset + i));
    offset += n;
    c.state->length += n;
  }
  const int64_t R = int64_t(rows.size());
  r.hidden = ops_.alloc({R, H});
  ops_.gather_rows(x, rows, r.hidden);
  ops_.rms_norm(r.hidden, w_.final_norm, cfg_.rms_norm_eps, r.hidden);
  r.logits = ops_.alloc({R, cfg_.vocab_size});
  ops_.matmul(r.hidden, w_.lm_head, r.logits);
  return r;
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
    Tensor co = conv_out.rows(row, row + n), oc = o.rows(row, row + n);
    ops_.causal_conv1d_silu(qkv.rows(row, row + n), w.conv, st.conv, co);
    // Prefill takes the chunked (WY) form, decode the recurrence; they compute the same function.
    ops_.gated_delta_rule(co, g.rows(row, row + n), beta.rows(row, row + n), d, st.ssm, oc, n > 1);
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
