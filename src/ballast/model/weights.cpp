#include "ballast/model/weights.h"

#include <cstring>
#include <set>
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
Tensor gather_plain_rows(const Tensor& src, const std::vector<RowBlock>& blocks) {
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
// A block-scaled matrix moves its scales with its rows, so the blocks must be whole 128-row
// blocks of the source (the last may end at the source's last row) and land on block boundaries.
// `what` names the tensor (file and name) for the error.
Tensor gather_row_blocks(const Tensor& src, const std::vector<RowBlock>& blocks, const std::string& what) {
  if (src.dtype() != DType::F8_E4M3_B128) return gather_plain_rows(src, blocks);
  std::vector<RowBlock> scale_rows;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const RowBlock& b = blocks[i];
    const bool whole = b.begin % kScaleBlock == 0 &&
                       (b.count % kScaleBlock == 0 || (b.begin + b.count == src.dim(0) && i + 1 == blocks.size()));
    check(whole,
          "{}: unpacking moves rows [{}, {}), which splits its 128-row FP8 scale blocks (an FP8 Qwen3-Next "
          "projection needs its head groups in multiples of 128 rows, as Qwen3-Next-80B's dk = 128 and r * dv = 256)",
          what, b.begin, b.begin + b.count);
    scale_rows.push_back({b.begin / kScaleBlock, scale_blocks(b.count)});
  }
  return Tensor::block_scaled(gather_plain_rows(src.elements(), blocks), gather_plain_rows(src.scales(), scale_rows));
}

// The checkpoint's scale tensor of an FP8 tensor: `X.weight_scale_inv` beside `X.weight`, or
// `X_scale_inv` beside a fused expert tensor `X` (transformers' name for it).
std::string scale_name(const std::string& name) { return name + "_scale_inv"; }

class Binder {
 public:
  Binder(const ModelConfig& cfg, const io::Checkpoint& ckpt) : c_(cfg), ck_(ckpt) {}

  // A tensor that is never FP8 (embeddings, norms, conv1d, gates' vectors).
  Tensor get(const std::string& name, Shape shape) const {
    const auto& info = ck_.info(name);
    check(info.dtype != DType::F8_E4M3,
          "{}: tensor '{}' is F8_E4M3, but only linear weights can be FP8 (with block scales): an FP8 embedding, "
          "norm or conv is no format ballast reads",
          ck_.file_of(name).path().string(), name);
    return fetch(name, std::move(shape));
  }
  Tensor vec(const std::string& name, int64_t n) const { return widen_f32(get(name, {n})); }
  bool has(const std::string& name) const { return ck_.has(name); }

  // A linear weight (`module` + ".weight", or a fused expert tensor of module `module`): as
  // stored, or, when it is F8_E4M3, block-scaled with its checkpoint scales. Every way such a
  // weight could be read wrong is refused: FP8 without a quantization_config declaring it, FP8 in
  // a module the config keeps unquantized, FP8 without its scales or with scales of another shape
  // or dtype, scales beside a weight that is not FP8.
  Tensor linear(const std::string& name, const std::string& module, Shape shape) const {
    const auto& info = ck_.info(name);
    const std::string file = ck_.file_of(name).path().string(), sname = scale_name(name);
    if (info.dtype != DType::F8_E4M3) {
      check(!ck_.has(sname), "{}: tensor '{}' holds block scales, but '{}' is {}, not F8_E4M3", file, sname, name,
            dtype_name(info.dtype));
      return fetch(name, std::move(shape));
    }
    check(c_.quant.fp8,
          "{}: tensor '{}' is F8_E4M3, but config.json has no quantization_config declaring FP8 weights (read as "
          "plain e4m3 values it would give wrong logits)",
          file, name);
    check(c_.quant.converts(module),
          "{}: tensor '{}' is F8_E4M3, but quantization_config.modules_to_not_convert keeps '{}' unquantized", file,
          name, module);
    check(ck_.has(sname), "{}: FP8 tensor '{}' has no block scales '{}' (F32, one per 128 x 128 block)", file, name,
          sname);
    const Tensor elements = ck_.get(name, shape);
    used_.insert(name);
    used_.insert(sname);
    const auto& sinfo = ck_.info(sname);
    Shape want(shape.begin(), shape.end() - 2);
    want.push_back(scale_blocks(shape[shape.size() - 2]));
    want.push_back(scale_blocks(shape.back()));
    check(sinfo.dtype == DType::F32, "{}: block scales '{}' are {}, expected F32", ck_.file_of(sname).path().string(),
          sname, dtype_name(sinfo.dtype));
    check(sinfo.shape == want, "{}: block scales '{}' have shape {}, expected {} for {} {} in 128 x 128 blocks",
          ck_.file_of(sname).path().string(), sname, Tensor::borrow(nullptr, sinfo.shape, DType::F32),
          Tensor::borrow(nullptr, want, DType::F32), name, elements);
    return Tensor::block_scaled(elements, ck_.get(sname));
  }
  Tensor linear(const std::string& module, Shape shape) const { return linear(module + ".weight", module, shape); }
  // Checkpoint tensors nothing bound. The vision tower of Qwen3.5's multimodal checkpoints is
  // left out on purpose (text only); anything else unused means a layout or architecture this
  // graph does not implement, which would compute without it.
  std::vector<std::string> unused() const {
    std::vector<std::string> out;
    for (const auto& n : ck_.names())
      if (!used_.count(n) && !n.starts_with("model.visual.")) out.push_back(n);
    return out;
  }

  // "<file>: tensor '<name>'", for messages.
  std::string what(const std::string& name) const {
    return ck_.file_of(name).path().string() + ": tensor '" + name + "'";
  }

  // "model." (as transformers saves) or "model.language_model." (released Qwen3.5).
  std::string trunk_prefix() const {
    if (has("model.language_model.embed_tokens.weight")) return "model.language_model.";
    return "model.";
  }

  AttentionWeights attention(const std::string& p) const {
    const int64_t H = c_.hidden_size, Hq = c_.num_heads, Hkv = c_.num_kv_heads, hd = c_.head_dim;
    AttentionWeights a;
    a.q_proj = linear(p + "q_proj", {Hq * 2 * hd, H});
    a.k_proj = linear(p + "k_proj", {Hkv * hd, H});
    a.v_proj = linear(p + "v_proj", {Hkv * hd, H});
    a.o_proj = linear(p + "o_proj", {H, Hq * hd});
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
      const Tensor qkvz = linear(p + "in_proj_qkvz", {2 * kd + 2 * vd, H});
      const int64_t group = 2 * dk + 2 * r * dv;
      std::vector<RowBlock> qkv, z;
      for (int64_t h = 0; h < Hk; ++h) qkv.push_back({h * group, dk});
      for (int64_t h = 0; h < Hk; ++h) qkv.push_back({h * group + dk, dk});
      for (int64_t h = 0; h < Hk; ++h) qkv.push_back({h * group + 2 * dk, r * dv});
      for (int64_t h = 0; h < Hk; ++h) z.push_back({h * group + 2 * dk + r * dv, r * dv});
      d.in_qkv = gather_row_blocks(qkvz, qkv, what(p + "in_proj_qkvz.weight"));
      d.in_z = gather_row_blocks(qkvz, z, what(p + "in_proj_qkvz.weight"));
      const Tensor ba = linear(p + "in_proj_ba", {2 * Hv, H});
      std::vector<RowBlock> b, a;
      for (int64_t h = 0; h < Hk; ++h) b.push_back({h * 2 * r, r});
      for (int64_t h = 0; h < Hk; ++h) a.push_back({h * 2 * r + r, r});
      d.in_b = gather_row_blocks(ba, b, what(p + "in_proj_ba.weight"));
      d.in_a = gather_row_blocks(ba, a, what(p + "in_proj_ba.weight"));
    } else {
      d.in_qkv = linear(p + "in_proj_qkv", {conv_dim, H});
      d.in_z = linear(p + "in_proj_z", {vd, H});
      d.in_b = linear(p + "in_proj_b", {Hv, H});
      d.in_a = linear(p + "in_proj_a", {Hv, H});
    }
    d.conv = widen_f32(get(p + "conv1d.weight", {conv_dim, 1, kc})).reshape({conv_dim, kc});
    d.A_log = vec(p + "A_log", Hv);
    d.dt_bias = vec(p + "dt_bias", Hv);
    d.norm = vec(p + "norm.weight", dv);
    d.out_proj = linear(p + "out_proj", {H, vd});
    return d;
  }

  kernels::SwigluWeights swiglu(const std::string& p, int64_t I) const {
    const int64_t H = c_.hidden_size;
    return {linear(p + "gate_proj", {I, H}), linear(p + "up_proj", {I, H}), linear(p + "down_proj", {H, I})};
  }

  MoeWeights sparse_moe(const std::string& p) const {
    const int64_t H = c_.hidden_size, E = c_.num_experts, I = c_.moe_intermediate_size;
    MoeWeights m;
    m.router = linear(p + "gate", {E, H});
    if (has(p + "experts.gate_up_proj")) {
      // Fused layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I]; experts are views.
      const Tensor gu = linear(p + "experts.gate_up_proj", p + "experts", {E, 2 * I, H});
      const Tensor down = linear(p + "experts.down_proj", p + "experts", {E, H, I});
      check(gu.dtype() != DType::F8_E4M3_B128 || I % kScaleBlock == 0,
            "{}: FP8 tensor '{}experts.gate_up_proj' cannot be split into gate and up: moe_intermediate_size {} is no "
            "multiple of 128, so a 128-row scale block holds rows of both (Qwen's FP8 releases store experts one by "
            "one)",
            ck_.file_of(p + "experts.gate_up_proj").path().string(), p, I);
      for (int64_t e = 0; e < E; ++e) {
        const Tensor ge = gu[e];
        m.experts.push_back({ge.rows(0, I), ge.rows(I, 2 * I), down[e]});
      }
    } else {
      for (int64_t e = 0; e < E; ++e) m.experts.push_back(swiglu(fmt::format("{}experts.{}.", p, e), I));
    }
    if (c_.shared_expert_intermediate_size > 0) {
      m.shared = swiglu(p + "shared_expert.", c_.shared_expert_intermediate_size);
      m.shared_gate = linear(p + "shared_expert_gate", {1, H});
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
  // A tensor of numbers (never ids or bytes), checked against `shape`, and marked as used.
  Tensor fetch(const std::string& name, Shape shape) const {
    const DType dt = ck_.info(name).dtype;
    check(dt == DType::F32 || dt == DType::BF16 || dt == DType::F16,
          "{}: tensor '{}' is {}; weights must be F32, BF16 or F16 (or F8_E4M3 with block scales)",
          ck_.file_of(name).path().string(), name, dtype_name(dt));
    used_.insert(name);
    return ck_.get(name, std::move(shape));
  }

  const ModelConfig& c_;
  const io::Checkpoint& ck_;
  mutable std::set<std::string> used_;
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
  else w.lm_head = b.linear("lm_head", {V, H});
  for (int i = 0; i < cfg.num_layers; ++i)
    w.layers.push_back(b.layer(fmt::format("{}layers.{}.", p, i), cfg.layer_types[i], cfg.ffn_types[i]));
  if (b.has("mtp.fc.weight")) {
    MtpWeights m;
    m.fc = b.linear("mtp.fc", {H, 2 * H});
    m.norm_embedding = b.vec("mtp.pre_fc_norm_embedding.weight", H);
    m.norm_hidden = b.vec("mtp.pre_fc_norm_hidden.weight", H);
    m.norm = b.vec("mtp.norm.weight", H);
    const int n = std::max(1, cfg.mtp_num_hidden_layers);
    for (int i = 0; i < n; ++i)
      m.layers.push_back(b.layer(fmt::format("mtp.layers.{}.", i), LayerType::FullAttention,
                                 cfg.num_experts > 0 ? FfnType::Moe : FfnType::Dense));
    w.mtp = std::move(m);
  }
  if (auto unused = b.unused(); !unused.empty())
    fail("{}: {} checkpoint tensor(s) are not used by the {} graph, e.g. '{}' (a layout or architecture ballast "
         "does not implement, or a config.json that does not match the weights)",
         ckpt.path().string(), unused.size(), cfg.architecture, unused.front());
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

void drop_routed_experts(ModelWeights& w) {
  for (auto& l : w.layers) l.moe.experts = {};
  if (w.mtp)
    for (auto& l : w.mtp->layers) l.moe.experts = {};
}

}  // namespace ballast::model
