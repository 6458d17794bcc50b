#include "ballast/model/random_checkpoint.h"

#include <cmath>
#include <fstream>
#include <map>
#include <random>

#include <fmt/format.h>

#include "ballast/core/error.h"
#include "ballast/core/tensor.h"
#include "ballast/io/safetensors.h"
#include "ballast/model/config.h"

namespace ballast::model {

nlohmann::json random_model_config(const RandomModelShape& s) {
  // Both keys, as Qwen's released configs have them (llama.cpp's converter reads the interval).
  nlohmann::json layer_types = nlohmann::json::array();
  for (int l = 0; l < s.layers; ++l) {
    const bool full = s.full_attention_interval > 0 && (l + 1) % s.full_attention_interval == 0;
    layer_types.push_back(full ? "full_attention" : "linear_attention");
  }
  nlohmann::json j = {
      {"architectures", {s.qwen35 ? "Qwen3_5MoeForCausalLM" : "Qwen3NextForCausalLM"}},
      {"model_type", s.qwen35 ? "qwen3_5_moe_text" : "qwen3_next"},
      {"vocab_size", s.vocab},
      {"hidden_size", s.hidden},
      {"num_hidden_layers", s.layers},
      {"max_position_embeddings", 262144},  // as Qwen3-Next's and Qwen3.5's configs
      {"rms_norm_eps", 1e-6},
      {"tie_word_embeddings", false},
      {"num_attention_heads", s.heads},
      {"num_key_value_heads", s.kv_heads},
      {"head_dim", s.head_dim},
      {"partial_rotary_factor", 0.25},
      {"rope_theta", 10000000.0},
      {"linear_num_key_heads", s.key_heads},
      {"linear_num_value_heads", s.value_heads},
      {"linear_key_head_dim", s.key_dim},
      {"linear_value_head_dim", s.value_dim},
      {"linear_conv_kernel_dim", 4},
      {"full_attention_interval", s.full_attention_interval},
      {"layer_types", layer_types},
      {"num_experts", s.experts},
      {"num_experts_per_tok", s.top_k},
      {"moe_intermediate_size", s.moe_intermediate},
      {"shared_expert_intermediate_size", s.shared_intermediate},
      {"intermediate_size", s.moe_intermediate * 4},
      {"decoder_sparse_step", 1},
      {"mlp_only_layers", nlohmann::json::array()},
      {"norm_topk_prob", true},
      {"mtp_num_hidden_layers", s.mtp_layers},
  };
  if (s.qwen35) j.erase("intermediate_size"), j.erase("decoder_sparse_step"), j.erase("mlp_only_layers");
  return j;
}

namespace {

class Writer {
 public:
  Writer(uint64_t seed, DType dtype) : rng_(seed), dtype_(dtype) {}

  void matrix(const std::string& name, int64_t rows, int64_t cols) {
    fill(name, {rows, cols}, float(1.0 / std::sqrt(double(cols))), 0.0f);
  }
  void fill(const std::string& name, std::vector<int64_t> shape, float scale, float offset, bool f32 = false) {
    const DType dt = f32 ? DType::F32 : dtype_;
    Tensor t = Tensor::zeros(shape, dt);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const int64_t n = t.numel();
    if (dt == DType::F32) {
      for (int64_t i = 0; i < n; ++i) t.f32()[i] = offset + scale * u(rng_);
    } else {
      check(dt == DType::BF16, "random checkpoint: dtype {} not supported", dtype_name(dt));
      auto* p = t.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(offset + scale * u(rng_));
    }
    tensors_[name] = std::move(t);
  }
  std::map<std::string, Tensor>& tensors() { return tensors_; }

 private:
  std::mt19937_64 rng_;
  DType dtype_;
  std::map<std::string, Tensor> tensors_;
};

}  // namespace

void write_random_checkpoint(const nlohmann::json& config, const std::filesystem::path& dir, uint64_t seed,
                             DType dtype) {
  const ModelConfig c = parse_model_config(config, (dir / "config.json").string());
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << config.dump(2);
  Writer w(seed, dtype);
  const int64_t H = c.hidden_size, V = c.vocab_size;
  w.fill("model.embed_tokens.weight", {V, H}, 1.0f, 0.0f);
  w.fill("model.norm.weight", {H}, 0.0f, 0.0f, true);
  if (!c.tie_word_embeddings) w.matrix("lm_head.weight", V, H);
  const int64_t Hk = c.linear_num_key_heads, Hv = c.linear_num_value_heads;
  const int64_t kd = Hk * c.linear_key_head_dim, vd = Hv * c.linear_value_head_dim;
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    w.fill(p + "input_layernorm.weight", {H}, 0.0f, 0.0f, true);
    w.fill(p + "post_attention_layernorm.weight", {H}, 0.0f, 0.0f, true);
    if (c.layer_types[l] == LayerType::FullAttention) {
      const int64_t Hq = c.num_heads, Hkv = c.num_kv_heads, hd = c.head_dim;
      w.matrix(p + "self_attn.q_proj.weight", Hq * hd * 2, H);
      w.matrix(p + "self_attn.k_proj.weight", Hkv * hd, H);
      w.matrix(p + "self_attn.v_proj.weight", Hkv * hd, H);
      w.matrix(p + "self_attn.o_proj.weight", H, Hq * hd);
      w.fill(p + "self_attn.q_norm.weight", {hd}, 0.0f, 0.0f, true);
      w.fill(p + "self_attn.k_norm.weight", {hd}, 0.0f, 0.0f, true);
    } else {
      const std::string a = p + "linear_attn.";
      w.matrix(a + "in_proj_qkvz.weight", 2 * kd + 2 * vd, H);
      w.matrix(a + "in_proj_ba.weight", 2 * Hv, H);
      w.fill(a + "conv1d.weight", {2 * kd + vd, 1, c.linear_conv_kernel_dim}, 0.5f, 0.0f, true);
      w.fill(a + "A_log", {Hv}, 0.5f, 0.0f, true);
      w.fill(a + "dt_bias", {Hv}, 0.5f, 0.0f, true);
      w.fill(a + "norm.weight", {c.linear_value_head_dim}, 0.1f, 1.0f, true);
      w.matrix(a + "out_proj.weight", H, vd);
    }
    const std::string m = p + "mlp.";
    auto swiglu = [&](const std::string& q, int64_t I) {
      w.matrix(q + "gate_proj.weight", I, H);
      w.matrix(q + "up_proj.weight", I, H);
      w.matrix(q + "down_proj.weight", H, I);
    };
    if (c.ffn_types[l] == FfnType::Moe) {
      w.matrix(m + "gate.weight", c.num_experts, H);
      for (int e = 0; e < c.num_experts; ++e) swiglu(fmt::format("{}experts.{}.", m, e), c.moe_intermediate_size);
      if (c.shared_expert_intermediate_size > 0) {
        swiglu(m + "shared_expert.", c.shared_expert_intermediate_size);
        w.matrix(m + "shared_expert_gate.weight", 1, H);
      }
    } else {
      swiglu(m, c.intermediate_size);
    }
  }
  io::write_safetensors(dir / "model.safetensors", w.tensors());
}

}  // namespace ballast::model
