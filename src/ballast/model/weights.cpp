#include "ballast/model/weights.h"

#include <cstring>
#include <string>

#include <fmt/format.h>

#include "ballast/core/error.h"
#include "ballast/io/checkpoint.h"

namespace ballast::model {

namespace {

using Shape = std::vector<int64_t>;

// Small parameter vectors are kept as owned F32 so that ops never widen them per call.
Tensor widen_f32(const Tensor& t) {
  if (t.dtype() == DType::F32) return t;
  Tensor out = Tensor::zeros(t.shape());
  to_f32(t.raw(), t.dtype(), out.f32(), size_t(t.numel()));
  return out;
}

// Gathers row blocks [begin, begin + count) of `src` (rows of equal byte size) into a new tensor.
struct RowBlock {
  int64_t begin, count;
};
Tensor gather_row_blocks(const Tensor& src, const std::vector<RowBlock>& blocks) {
  int64_t rows = 0;
  for (auto& b : blocks) rows += b.count;
  Shape shape = src.shape();
  shape[0] = rows;
  Tensor out = Tensor::zeros(shape, src.dtype());
  const size_t row_bytes = src.nbytes() / size_t(src.dim(0));
  char* dst = static_cast<char*>(out.raw());
  for (auto& b : blocks) {
    std::memcpy(dst, static_cast<const char*>(src.raw()) + size_t(b.begin) * row_bytes, size_t(b.count) * row_bytes);
    dst += size_t(b.count) * row_bytes;
  }
  return out;
}

class Binder {
 public:
  Binder(const ModelConfig& cfg, const io::Checkpoint& ckpt) : c_(cfg), ck_(ckpt) {}

  Tensor get(const std::string& name, Shape shape) const { return ck_.get(name, std::move(shape)); }
  Tensor vec(const std::string& name, int64_t n) const { return widen_f32(get(name, {n})); }
  bool has(const std::string& name) const { return ck_.has(name); }

  // "model." (as transformers saves) or "model.language_model." (released Qwen3.5).
  std::string trunk_prefix() const {
    if (has("model.language_model.embed_tokens.weight")) return "model.language_model.";
    return "model.";
  }

  AttentionWeights attention(const std::string& p) const {
    const int64_t H = c_.hidden_size, Hq = c_.num_heads, Hkv = c_.num_kv_heads, hd = c_.head_dim;
    AttentionWeights a;
    a.q_proj = get(p + "q_proj.weight", {Hq * 2 * hd, H});
    a.k_proj = get(p + "k_proj.weight", {Hkv * hd, H});
    a.v_proj = get(p + "v_proj.weight", {Hkv * hd, H});
    a.o_proj = get(p + "o_proj.weight", {H, Hq * hd});
    a.q_norm = vec(p + "q_norm.weight", hd);
    a.k_norm = vec(p + "k_norm.weight", hd);
    return a;
  }

  DeltaNetWeights deltanet(const std::string& p) const {
    const int64_t H = c_.hidden_size, Hk = c_.linear_num_key_heads, Hv = c_.linear_num_value_heads;
    const int64_t dk = c_.linear_key_head_dim, dv = c_.linear_value_head_dim, r = Hv / Hk;
    const int64_t kd = Hk * dk, vd = Hv * dv, conv_dim = 2 * kd + vd, kc = c_.linear_conv_kernel_dim;
    DeltaNetWeights d;
    if (has(p + "in_proj_qkvz.weight")) {
      // Qwen3-Next packs per key-head group: [q (dk) | k (dk) | v (r*dv) | z (r*dv)] x Hk, and
      // [b (r) | a (r)] x Hk. Unpack once so both families share one layout.
      const Tensor qkvz = get(p + "in_proj_qkvz.weight", {2 * kd + 2 * vd, H});
      const int64_t group = 2 * dk + 2 * r * dv;
      std::vector<RowBlock> qkv, z;
      for (int64_t h = 0; h < Hk; ++h) qkv.push_back({h * group, dk});
      for (int64_t h = 0; h < Hk; ++h) qkv.push_back({h * group + dk, dk});
      for (int64_t h = 0; h < Hk; ++h) qkv.push_back({h * group + 2 * dk, r * dv});
      for (int64_t h = 0; h < Hk; ++h) z.push_back({h * group + 2 * dk + r * dv, r * dv});
      d.in_qkv = gather_row_blocks(qkvz, qkv);
      d.in_z = gather_row_blocks(qkvz, z);
      const Tensor ba = get(p + "in_proj_ba.weight", {2 * Hv, H});
      std::vector<RowBlock> b, a;
      for (int64_t h = 0; h < Hk; ++h) b.push_back({h * 2 * r, r});
      for (int64_t h = 0; h < Hk; ++h) a.push_back({h * 2 * r + r, r});
      d.in_b = gather_row_blocks(ba, b);
      d.in_a = gather_row_blocks(ba, a);
    } else {
      d.in_qkv = get(p + "in_proj_qkv.weight", {conv_dim, H});
      d.in_z = get(p + "in_proj_z.weight", {vd, H});
      d.in_b = get(p + "in_proj_b.weight", {Hv, H});
      d.in_a = get(p + "in_proj_a.weight", {Hv, H});
    }
    d.conv = widen_f32(get(p + "conv1d.weight", {conv_dim, 1, kc})).reshape({conv_dim, kc});
    d.A_log = vec(p + "A_log", Hv);
    d.dt_bias = vec(p + "dt_bias", Hv);
    d.norm = vec(p + "norm.weight", dv);
    d.out_proj = get(p + "out_proj.weight", {H, vd});
    return d;
  }

  kernels::SwigluWeights swiglu(const std::string& p, int64_t I) const {
    const int64_t H = c_.hidden_size;
    return {get(p + "gate_proj.weight", {I, H}), get(p + "up_proj.weight", {I, H}),
            get(p + "down_proj.weight", {H, I})};
  }

  MoeWeights sparse_moe(const std::string& p) const {
    const int64_t H = c_.hidden_size, E = c_.num_experts, I = c_.moe_intermediate_size;
    MoeWeights m;
    m.router = get(p + "gate.weight", {E, H});
    if (has(p + "experts.gate_up_proj")) {
      // Fused layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I]; experts are views.
      const Tensor gu = get(p + "experts.gate_up_proj", {E, 2 * I, H});
      const Tensor down = get(p + "experts.down_proj", {E, H, I});
      for (int64_t e = 0; e < E; ++e) {
        const Tensor ge = gu[e];
        m.experts.push_back({ge.rows(0, I), ge.rows(I, 2 * I), down[e]});
      }
    } else {
      for (int64_t e = 0; e < E; ++e) m.experts.push_back(swiglu(fmt::format("{}experts.{}.", p, e), I));
    }
    if (c_.shared_expert_intermediate_size > 0) {
      m.shared = swiglu(p + "shared_expert.", c_.shared_expert_intermediate_size);
      m.shared_gate = get(p + "shared_expert_gate.weight", {1, H});
    }
    return m;
  }

  LayerWeights layer(const std::string& p, LayerType type, FfnType ffn) const {
    const int64_t H = c_.hidden_size;
    LayerWeights l;
    l.type = type;
    l.ffn = ffn;
    l.input_norm = vec(p + "input_layernorm.weight", H);
    l.post_norm = vec(p + "post_attention_layernorm.weight", H);
    if (type == LayerType::FullAttention) l.attn = attention(p + "self_attn.");
    else l.delta = deltanet(p + "linear_attn.");
    if (ffn == FfnType::Moe) l.moe = sparse_moe(p + "mlp.");
    else l.dense = swiglu(p + "mlp.", c_.intermediate_size);
    return l;
  }

 private:
  const ModelConfig& c_;
  const io::Checkpoint& ck_;
};

}  // namespace

ModelWeights bind_weights(const ModelConfig& cfg, const io::Checkpoint& ckpt) {
  Binder b(cfg, ckpt);
  const int64_t V = cfg.vocab_size, H = cfg.hidden_size;
  const std::string p = b.trunk_prefix();
  ModelWeights w;
  w.embed = b.get(p + "embed_tokens.weight", {V, H});
  w.final_norm = b.vec(p + "norm.weight", H);
  if (cfg.tie_word_embeddings && !b.has("lm_head.weight")) w.lm_head = w.embed;
  else w.lm_head = b.get("lm_head.weight", {V, H});
  for (int i = 0; i < cfg.num_layers; ++i)
    w.layers.push_back(b.layer(fmt::format("{}layers.{}.", p, i), cfg.layer_types[i], cfg.ffn_types[i]));
  if (b.has("mtp.fc.weight")) {
    MtpWeights m;
    m.fc = b.get("mtp.fc.weight", {H, 2 * H});
    m.norm_embedding = b.vec("mtp.pre_fc_norm_embedding.weight", H);
    m.norm_hidden = b.vec("mtp.pre_fc_norm_hidden.weight", H);
    m.norm = b.vec("mtp.norm.weight", H);
    const int n = std::max(1, cfg.mtp_num_hidden_layers);
    for (int i = 0; i < n; ++i)
      m.layers.push_back(b.layer(fmt::format("mtp.layers.{}.", i), LayerType::FullAttention,
                                 cfg.num_experts > 0 ? FfnType::Moe : FfnType::Dense));
    w.mtp = std::move(m);
  }
  return w;
}

namespace {
void each_swiglu(kernels::SwigluWeights& e, const std::function<void(Tensor&)>& fn) {
  for (Tensor* t : {&e.gate, &e.up, &e.down})
    if (t->defined()) fn(*t);
}

void each_layer(LayerWeights& l, const std::function<void(Tensor&)>& fn) {
  for (Tensor* t : {&l.input_norm, &l.post_norm, &l.attn.q_proj, &l.attn.k_proj, &l.attn.v_proj, &l.attn.o_proj,
                    &l.attn.q_norm, &l.attn.k_norm, &l.delta.in_qkv, &l.delta.in_z, &l.delta.in_b, &l.delta.in_a,
                    &l.delta.conv, &l.delta.A_log, &l.delta.dt_bias, &l.delta.norm, &l.delta.out_proj,
                    &l.moe.router, &l.moe.shared_gate})
    if (t->defined()) fn(*t);
  for (auto& e : l.moe.experts) each_swiglu(e, fn);
  if (l.moe.shared) each_swiglu(*l.moe.shared, fn);
  each_swiglu(l.dense, fn);
}
}  // namespace

void for_each_tensor(ModelWeights& w, const std::function<void(Tensor&)>& fn) {
  const bool tied = w.lm_head.raw() == w.embed.raw();
  fn(w.embed);
  fn(w.final_norm);
  if (tied) w.lm_head = w.embed;
  else fn(w.lm_head);
  for (auto& l : w.layers) each_layer(l, fn);
  if (w.mtp) {
    for (Tensor* t : {&w.mtp->fc, &w.mtp->norm_embedding, &w.mtp->norm_hidden, &w.mtp->norm}) fn(*t);
    for (auto& l : w.mtp->layers) each_layer(l, fn);
  }
}

}  // namespace ballast::model
