#include "ballast/model/random_weights.h"

#include <cmath>

#include <fmt/format.h>

#include "ballast/core/error.h"
#include "ballast/core/hash.h"

namespace ballast::model {

RandomModelShape preset_shape(const std::string& name, int layers) {
  RandomModelShape s;  // "mid-size": the defaults
  if (name == "qwen3-next-80b-a3b") {
    // Qwen/Qwen3-Next-80B-A3B-Instruct config.json.
    s = {.hidden = 2048, .layers = 48, .vocab = 151936, .heads = 16, .kv_heads = 2, .head_dim = 256,
         .key_heads = 16, .value_heads = 32, .key_dim = 128, .value_dim = 128, .experts = 512, .top_k = 10,
         .moe_intermediate = 512, .shared_intermediate = 512, .full_attention_interval = 4};
  } else if (name == "qwen3.5-397b-a17b") {
    // Qwen/Qwen3.5-397B-A17B config.json (text_config).
    s = {.hidden = 4096, .layers = 60, .vocab = 248320, .heads = 32, .kv_heads = 2, .head_dim = 256,
         .key_heads = 16, .value_heads = 64, .key_dim = 128, .value_dim = 128, .experts = 512, .top_k = 10,
         .moe_intermediate = 1024, .shared_intermediate = 1024, .full_attention_interval = 4, .qwen35 = true};
  } else {
    check(name == "mid-size", "unknown synthetic model \"{}\" (known: {})", name, fmt::join(preset_names(), ", "));
  }
  check(layers >= 0 && layers <= s.layers, "--layers {}: {} has {} layers", layers, name, s.layers);
  if (layers > 0) s.layers = layers;
  return s;
}

std::vector<std::string> preset_names() { return {"mid-size", "qwen3-next-80b-a3b", "qwen3.5-397b-a17b"}; }

namespace {

class Filler {
 public:
  Filler(kernels::Backend& be, uint64_t seed, DType dtype) : be_(be), seed_(seed), dtype_(dtype) {}

  // A [rows, cols] matrix in the weight dtype, uniform in +-1/sqrt(cols).
  Tensor matrix(int64_t rows, int64_t cols) { return weight({rows, cols}, float(1.0 / std::sqrt(double(cols)))); }
  // A matrix the FP8 releases leave in bf16 (embedding, head, routers, DeltaNet a/b).
  Tensor plain_matrix(int64_t rows, int64_t cols) {
    return uniform({rows, cols}, plain_dtype(), float(1.0 / std::sqrt(double(cols))));
  }
  DType plain_dtype() const { return dtype_ == DType::F8_E4M3_B128 ? DType::BF16 : dtype_; }
  // A weight in the weight dtype, uniform in +-bound. FP8 as in Qwen's -FP8 releases: e4m3 elements
  // uniform over +-448 (the format's range) and 128 x 128 block scales uniform in +-bound / 448, so
  // that values stay within +-bound like the others'.
  Tensor weight(std::vector<int64_t> shape, float bound) {
    if (dtype_ != DType::F8_E4M3_B128) return uniform(std::move(shape), dtype_, bound);
    const int64_t R = shape[0], C = shape[1];
    const Tensor elements = uniform({R, C}, DType::F8_E4M3, kE4m3Max);
    return Tensor::block_scaled(elements, uniform({scale_blocks(R), scale_blocks(C)}, DType::F32, bound / kE4m3Max));
  }
  Tensor uniform(std::vector<int64_t> shape, DType dt, float scale) {
    Tensor t = be_.alloc(std::move(shape), dt);
    be_.ops().fill_uniform(t, mix64(seed_ + ++tensors_), scale);
    return t;
  }
  Tensor zeros(std::vector<int64_t> shape) {
    Tensor t = be_.alloc(std::move(shape), DType::F32);
    be_.ops().zero(t);
    return t;
  }
  // E experts of one SwiGLU shape, as views into one [E, I, H] (gate, up) and [E, H, I] (down)
  // (block-scaled FP8: I and H multiples of 128, so that each expert has whole blocks).
  std::vector<kernels::SwigluWeights> experts(int64_t E, int64_t I, int64_t H) {
    check(dtype_ != DType::F8_E4M3_B128 || E == 1 || (I % kScaleBlock == 0 && H % kScaleBlock == 0),
          "random FP8 experts: I {} and H {} must be multiples of {}", I, H, kScaleBlock);
    const Tensor gate = weight({E * I, H}, float(1.0 / std::sqrt(double(H))));
    const Tensor up = weight({E * I, H}, float(1.0 / std::sqrt(double(H))));
    const Tensor down = weight({E * H, I}, float(1.0 / std::sqrt(double(I))));
    std::vector<kernels::SwigluWeights> out;
    for (int64_t e = 0; e < E; ++e)
      out.push_back({gate.rows(e * I, (e + 1) * I), up.rows(e * I, (e + 1) * I), down.rows(e * H, (e + 1) * H)});
    return out;
  }
  kernels::SwigluWeights swiglu(int64_t I, int64_t H) { return experts(1, I, H)[0]; }

 private:
  kernels::Backend& be_;
  uint64_t seed_;
  DType dtype_;
  uint64_t tensors_ = 0;
};

}  // namespace

ModelWeights random_weights(const ModelConfig& c, kernels::Backend& be, uint64_t seed, DType dtype) {
  check(dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::F32 || dtype == DType::F8_E4M3_B128,
        "random weights: dtype {} (BF16, F16, F32 or F8_E4M3_B128)", dtype_name(dtype));
  Filler f(be, seed, dtype);
  const int64_t H = c.hidden_size, V = c.vocab_size;
  ModelWeights w;
  w.embed = f.uniform({V, H}, f.plain_dtype(), 1.0f);
  w.final_norm = f.zeros({H});
  w.lm_head = c.tie_word_embeddings ? w.embed : f.plain_matrix(V, H);
  const int64_t Hk = c.linear_num_key_heads, Hv = c.linear_num_value_heads;
  const int64_t kd = Hk * c.linear_key_head_dim, vd = Hv * c.linear_value_head_dim;
  auto layer = [&](LayerType type, FfnType ffn) {
    LayerWeights l;
    l.type = type;
    l.ffn = ffn;
    l.input_norm = f.zeros({H});
    l.post_norm = f.zeros({H});
    if (l.type == LayerType::FullAttention) {
      const int64_t Hq = c.num_heads, Hkv = c.num_kv_heads, hd = c.head_dim;
      l.attn = {f.matrix(Hq * 2 * hd, H), f.matrix(Hkv * hd, H), f.matrix(Hkv * hd, H), f.matrix(H, Hq * hd),
                f.zeros({hd}), f.zeros({hd})};
    } else {
      DeltaNetWeights& d = l.delta;
      d.in_qkv = f.matrix(2 * kd + vd, H);
      d.in_z = f.matrix(vd, H);
      d.in_b = f.plain_matrix(Hv, H);
      d.in_a = f.plain_matrix(Hv, H);
      d.conv = f.uniform({2 * kd + vd, c.linear_conv_kernel_dim}, DType::F32, 0.5f);
      d.A_log = f.uniform({Hv}, DType::F32, 0.5f);
      d.dt_bias = f.uniform({Hv}, DType::F32, 0.5f);
      d.norm = f.uniform({c.linear_value_head_dim}, DType::F32, 1.0f);
      d.out_proj = f.matrix(H, vd);
    }
    if (l.ffn == FfnType::Moe) {
      l.moe.router = f.plain_matrix(c.num_experts, H);
      l.moe.experts = f.experts(c.num_experts, c.moe_intermediate_size, H);
      if (c.shared_expert_intermediate_size > 0) {
        l.moe.shared = f.swiglu(c.shared_expert_intermediate_size, H);
        l.moe.shared_gate = f.plain_matrix(1, H);
      }
    } else {
      l.dense = f.swiglu(c.intermediate_size, H);
    }
    return l;
  };
  for (int i = 0; i < c.num_layers; ++i) w.layers.push_back(layer(c.layer_types[size_t(i)], c.ffn_types[size_t(i)]));
  if (c.mtp_num_hidden_layers > 0) {
    // The head as the releases have it: full-attention layers with the model's MoE, mtp.fc in bf16.
    MtpWeights m;
    m.fc = f.plain_matrix(H, 2 * H);
    m.norm_embedding = f.zeros({H});
    m.norm_hidden = f.zeros({H});
    m.norm = f.zeros({H});
    for (int i = 0; i < c.mtp_num_hidden_layers; ++i)
      m.layers.push_back(layer(LayerType::FullAttention, c.num_experts > 0 ? FfnType::Moe : FfnType::Dense));
    w.mtp = std::move(m);
  }
  return w;
}

}  // namespace ballast::model
