#include "ballast/model/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ballast/core/error.h"
#include "ballast/model/param_count.h"
#include "support/expect_error.h"

namespace ballast::model {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

using ballast::test::expect_error;

// Qwen3-Next-80B-A3B's config.json (trimmed of fields the engine does not read).
json qwen3_next_80b() {
  return json::parse(R"({
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
    "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": false, "hidden_act": "silu",
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_scaling": null,
    "full_attention_interval": 4,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": true, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "intermediate_size": 5120
  })");
}

// Qwen3.5-35B-A3B as released: multimodal wrapper, text under text_config, rope_parameters.
json qwen35_released() {
  json text = json::parse(R"({
    "model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": 2048,
    "num_hidden_layers": 40, "rms_norm_eps": 1e-06,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_interleaved": true, "mrope_section": [11, 11, 10]},
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "mtp_num_hidden_layers": 1
  })");
  json lt = json::array();
  for (int i = 0; i < 40; ++i) lt.push_back((i + 1) % 4 == 0 ? "full_attention" : "linear_attention");
  text["layer_types"] = lt;
  return {{"architectures", {"Qwen3_5MoeForConditionalGeneration"}},
          {"model_type", "qwen3_5_moe"},
          {"tie_word_embeddings", false},
          {"text_config", text},
          {"vision_config", {{"depth", 27}}}};
}

std::string layer_string(const ModelConfig& c) {
  std::string s;
  for (auto t : c.layer_types) s += t == LayerType::FullAttention ? 'F' : 'L';
  return s;
}

TEST(Config, Qwen3Next80B) {
  auto c = parse_model_config(qwen3_next_80b(), "config.json");
  EXPECT_EQ(c.family, Family::Qwen3Next);
  EXPECT_EQ(c.architecture, "Qwen3NextForCausalLM");
  EXPECT_EQ(c.num_layers, 48);
  EXPECT_EQ(c.num_full_attention_layers(), 12);
  EXPECT_EQ(c.num_linear_attention_layers(), 36);
  EXPECT_EQ(layer_string(c).substr(0, 8), "LLLFLLLF");
  EXPECT_EQ(c.num_moe_layers(), 48);
  EXPECT_EQ(c.rotary_dim(), 64);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e7);
  EXPECT_EQ(c.num_experts, 512);
  EXPECT_EQ(c.num_experts_per_tok, 10);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);

  // Published sizes: about 80B total and 3B active.
  auto p = count_parameters(c);
  EXPECT_NEAR(double(p.total()) / 1e9, 79.7, 0.5);
  // "A3B" counts neither embedding nor lm_head.
  EXPECT_NEAR(double(p.active_per_token() - p.embedding - p.lm_head) / 1e9, 3.0, 0.3);
  // KV: 12 layers * 2 * 2 heads * 256 * 2 bytes.
  EXPECT_EQ(kv_bytes_per_token(c, 2), 12 * 2 * 2 * 256 * 2);
}

TEST(Config, Qwen35Released) {
  auto c = parse_model_config(qwen35_released(), "config.json");
  EXPECT_EQ(c.family, Family::Qwen35Moe);
  EXPECT_EQ(c.architecture, "Qwen3_5MoeForConditionalGeneration");
  EXPECT_EQ(c.model_type, "qwen3_5_moe_text");
  EXPECT_EQ(c.num_layers, 40);
  EXPECT_EQ(c.num_full_attention_layers(), 10);
  EXPECT_EQ(c.num_moe_layers(), 40);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e7);
  EXPECT_FLOAT_EQ(c.partial_rotary_factor, 0.25f);
  EXPECT_EQ(c.mtp_num_hidden_layers, 1);
  EXPECT_EQ(c.vocab_size, 248320);
  auto p = count_parameters(c);
  EXPECT_NEAR(double(p.total() + p.mtp) / 1e9, 35.0, 1.5);
  // Conventions differ on counting embeddings here; both land near the advertised 3B.
  EXPECT_NEAR(double(p.active_per_token()) / 1e9, 3.0, 0.6);
  EXPECT_NEAR(double(p.active_per_token() - p.embedding - p.lm_head) / 1e9, 3.0, 0.6);
}

// quantization_config as Qwen3-Next-80B-A3B-Instruct-FP8 writes it (its list trimmed to a few).
json qwen3_next_fp8_quantization() {
  return json::parse(R"({
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    "modules_to_not_convert": ["lm_head", "model.layers.0.input_layernorm", "model.layers.0.linear_attn.in_proj_ba",
                               "model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate", "mtp.fc",
                               "mtp.layers.0.mlp.gate"]
  })");
}

TEST(Config, Fp8QuantizationAsReleased) {
  json j = qwen3_next_80b();
  EXPECT_FALSE(parse_model_config(j, "config.json").quant.fp8);
  j["quantization_config"] = qwen3_next_fp8_quantization();
  const auto q = parse_model_config(j, "config.json").quant;
  EXPECT_TRUE(q.fp8);
  EXPECT_EQ(q.modules_to_not_convert.size(), 7u);
  // Listed modules (and what sits under them) stay unquantized; the others may be FP8.
  EXPECT_FALSE(q.converts("lm_head"));
  EXPECT_FALSE(q.converts("model.layers.0.mlp.gate"));
  EXPECT_FALSE(q.converts("mtp.fc"));
  EXPECT_TRUE(q.converts("model.layers.0.mlp.gate_proj"));  // a dotted name, not a string prefix
  EXPECT_TRUE(q.converts("model.layers.1.mlp.gate"));
  EXPECT_TRUE(q.converts("model.layers.0.mlp.experts.3.gate_proj"));
  EXPECT_TRUE(q.converts("model.layers.0.linear_attn.in_proj_qkvz"));
  // A bare entry names that module anywhere; a regex entry is matched from the name's start.
  j["quantization_config"]["modules_to_not_convert"] = {"shared_expert_gate", "model\\.layers\\.[0-9]+\\.self_attn"};
  const auto r = parse_model_config(j, "config.json").quant;
  EXPECT_FALSE(r.converts("model.layers.7.mlp.shared_expert_gate"));
  EXPECT_FALSE(r.converts("model.layers.3.self_attn.q_proj"));
  EXPECT_TRUE(r.converts("mtp.layers.0.self_attn.q_proj"));
  // transformers' defaults: no fmt, activation_scheme or weight_block_size means e4m3, dynamic, [128, 128].
  j["quantization_config"] = {{"quant_method", "fp8"}, {"dequantize", false}};
  EXPECT_TRUE(parse_model_config(j, "config.json").quant.fp8);
  // Qwen3.5's release: at the top level beside text_config; a text_config one is read too.
  json r35 = qwen35_released();
  r35["quantization_config"] = qwen3_next_fp8_quantization();
  EXPECT_TRUE(parse_model_config(r35, "config.json").quant.fp8);
  json n35 = qwen35_released();
  n35["text_config"]["quantization_config"] = qwen3_next_fp8_quantization();
  EXPECT_TRUE(parse_model_config(n35, "config.json").quant.fp8);
}

// Every quantization ballast does not implement is refused naming the field, never read as plain weights.
TEST(ConfigErrors, UnsupportedQuantization) {
  struct Case {
    std::string what;
    std::function<void(json&)> edit;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"gptq", [](json& q) { q = {{"quant_method", "gptq"}, {"bits", 4}}; }, {"quantization_config.quant_method", "gptq"}},
      {"awq", [](json& q) { q["quant_method"] = "awq"; }, {"quantization_config.quant_method", "awq", "fp8"}},
      {"compressed-tensors", [](json& q) { q["quant_method"] = "compressed-tensors"; },
       {"quantization_config.quant_method", "compressed-tensors"}},
      {"no quant_method", [](json& q) { q.erase("quant_method"); }, {"quantization_config.quant_method", "missing"}},
      {"e5m2", [](json& q) { q["fmt"] = "e5m2"; }, {"quantization_config.fmt", "e5m2", "e4m3"}},
      {"static activations", [](json& q) { q["activation_scheme"] = "static"; },
       {"quantization_config.activation_scheme", "static", "dynamic"}},
      {"block 64", [](json& q) { q["weight_block_size"] = {64, 64}; },
       {"quantization_config.weight_block_size", "[64,64]", "[128, 128]"}},
      {"block 128x64", [](json& q) { q["weight_block_size"] = {128, 64}; },
       {"quantization_config.weight_block_size", "[128,64]"}},
      {"per tensor", [](json& q) { q["weight_block_size"] = nullptr; },
       {"quantization_config.weight_block_size", "one scale per tensor"}},
      {"ue8m0 scales", [](json& q) { q["scale_fmt"] = "ue8m0"; }, {"quantization_config.scale_fmt", "ue8m0"}},
      {"unknown key", [](json& q) { q["weight_per_channel"] = true; }, {"quantization_config.weight_per_channel"}},
      {"not an object", [](json& q) { q = "fp8"; }, {"\"quantization_config\"", "object"}},
      {"modules not a list", [](json& q) { q["modules_to_not_convert"] = "lm_head"; },
       {"quantization_config.modules_to_not_convert", "array"}},
      {"bad regex", [](json& q) { q["modules_to_not_convert"] = {"model.layers.(0"}; },
       {"quantization_config.modules_to_not_convert[0]", "regex"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    json j = qwen3_next_80b();
    j["quantization_config"] = qwen3_next_fp8_quantization();
    c.edit(j["quantization_config"]);
    try {
      parse_model_config(j, "/m/config.json");
      ADD_FAILURE() << "accepted: " << c.what;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("/m/config.json"));
      for (const auto& p : c.expect) EXPECT_THAT(e.what(), HasSubstr(p));
    }
  }
  json both = qwen35_released();
  both["quantization_config"] = qwen3_next_fp8_quantization();
  both["text_config"]["quantization_config"] = qwen3_next_fp8_quantization();
  expect_error([&] { parse_model_config(both, "c.json"); }, {"c.json", "text_config.quantization_config"});
}

TEST(Config, Qwen35CausalLMTopLevel) {
  json j = qwen35_released()["text_config"];
  j["architectures"] = {"Qwen3_5MoeForCausalLM"};
  j["norm_topk_prob"] = false;  // ignored: Qwen3.5 always renormalises
  j["tie_word_embeddings"] = true;
  auto c = parse_model_config(j, "config.json");
  EXPECT_EQ(c.family, Family::Qwen35Moe);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(count_parameters(c).lm_head, 0);
}

TEST(Config, Qwen3NextDenseLayersAndDefaults) {
  json j = qwen3_next_80b();
  j["num_hidden_layers"] = 6;
  j["full_attention_interval"] = 3;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  j["norm_topk_prob"] = false;
  j.erase("head_dim");
  j.erase("rope_theta");
  j.erase("partial_rotary_factor");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e6}, {"partial_rotary_factor", 0.5}};
  auto c = parse_model_config(j, "config.json");
  EXPECT_EQ(layer_string(c), "LLFLLF");
  // MoE iff (i+1) % 2 == 0 and i not in {3}: layers 1 and 5.
  std::vector<FfnType> want = {FfnType::Dense, FfnType::Moe, FfnType::Dense,
                               FfnType::Dense, FfnType::Dense, FfnType::Moe};
  EXPECT_EQ(c.ffn_types, want);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.head_dim, 2048 / 16);  // default hidden_size / num_attention_heads
  EXPECT_DOUBLE_EQ(c.rope_theta, 5e6);
  EXPECT_EQ(c.rotary_dim(), 64);
  EXPECT_EQ(c.intermediate_size, 5120);
  auto p = count_parameters(c);
  EXPECT_EQ(p.dense_mlp, 4 * 3 * 2048 * 5120LL);
}

TEST(Config, NestedRopeParametersWinOverStaleTopLevel) {
  // transformers v5 saves a stale top-level partial_rotary_factor beside the one it reads.
  json j = qwen3_next_80b();
  j["partial_rotary_factor"] = 0.25;
  j["rope_theta"] = 1000.0;
  j["rope_parameters"] = {{"rope_type", "default"}, {"partial_rotary_factor", 0.5}};
  auto c = parse_model_config(j, "config.json");
  EXPECT_EQ(c.rotary_dim(), 128);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1000.0);  // absent inside: the top level fills in
}

TEST(Config, ExplicitLayerTypesWin) {
  json j = qwen3_next_80b();
  j["num_hidden_layers"] = 3;
  j["layer_types"] = {"full_attention", "linear_attention", "full_attention"};
  auto c = parse_model_config(j, "config.json");
  EXPECT_EQ(layer_string(c), "FLF");
}

TEST(Config, ArchitectureFromModelType) {
  json j = qwen3_next_80b();
  j.erase("architectures");
  EXPECT_EQ(parse_model_config(j, "c.json").architecture, "Qwen3NextForCausalLM");
}

TEST(Config, LoadFromDirectory) {
  auto dir = std::filesystem::temp_directory_path() / "ballast_test_config_dir";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << qwen3_next_80b().dump();
  EXPECT_EQ(load_model_config(dir).num_layers, 48);
  EXPECT_EQ(load_model_config(dir / "config.json").num_layers, 48);
  std::ofstream(dir / "config.json") << "{\"architectures\": [";
  expect_error([&] { load_model_config(dir); }, {(dir / "config.json").string(), "malformed JSON"});
  std::filesystem::remove_all(dir);
  expect_error([&] { load_model_config(dir); }, {"config.json", "cannot open"});
}

// Each malformed config must fail with an error naming the file and the field.
struct Bad {
  const char* what;
  std::function<void(json&)> edit;
  std::vector<std::string> expect;
  bool released = false;  // edit the Qwen3.5 released form instead of Qwen3-Next
};

TEST(ConfigErrors, Malformed) {
  std::vector<Bad> cases = {
      {"missing hidden_size", [](json& j) { j.erase("hidden_size"); }, {"missing required field \"hidden_size\""}},
      {"string layers", [](json& j) { j["num_hidden_layers"] = "48"; }, {"\"num_hidden_layers\"", "integer"}},
      {"float heads", [](json& j) { j["num_attention_heads"] = 16.5; }, {"\"num_attention_heads\"", "integer"}},
      {"zero vocab", [](json& j) { j["vocab_size"] = 0; }, {"\"vocab_size\"", "positive"}},
      {"k > E", [](json& j) { j["num_experts_per_tok"] = 513; }, {"\"num_experts_per_tok\"", "exceeds num_experts 512"}},
      {"Hv % Hk", [](json& j) { j["linear_num_value_heads"] = 24; j["linear_num_key_heads"] = 16; },
       {"\"linear_num_value_heads\"", "multiple"}},
      {"Hq % Hkv", [](json& j) { j["num_key_value_heads"] = 3; }, {"\"num_key_value_heads\"", "multiple"}},
      {"layer_types length", [](json& j) { j["layer_types"] = {"full_attention"}; },
       {"\"layer_types\"", "1 entries", "48"}},
      {"unknown layer type", [](json& j) {
         j["num_hidden_layers"] = 2;
         j["layer_types"] = {"full_attention", "sliding_attention"};
       }, {"\"layer_types[1]\"", "sliding_attention"}},
      {"unsupported arch", [](json& j) { j["architectures"] = {"LlamaForCausalLM"}; },
       {"\"architectures\"", "LlamaForCausalLM"}},
      {"architectures not array", [](json& j) { j["architectures"] = "Qwen3NextForCausalLM"; }, {"\"architectures\""}},
      {"model_type mismatch", [](json& j) { j["model_type"] = "qwen3_moe"; }, {"\"model_type\"", "qwen3_moe"}},
      {"no arch, bad model_type", [](json& j) { j.erase("architectures"); j["model_type"] = "llama"; },
       {"\"architectures\"", "llama"}},
      {"rope scaling yarn", [](json& j) { j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4}}; },
       {"\"rope_scaling.rope_type\"", "yarn"}},
      {"rope_theta string", [](json& j) { j["rope_theta"] = "1e7"; }, {"\"rope_theta\"", "number"}},
      {"odd rotary dim", [](json& j) { j["partial_rotary_factor"] = 1.0 / 256; }, {"\"partial_rotary_factor\"", "even"}},
      {"mlp_only_layers out of range", [](json& j) { j["mlp_only_layers"] = {48}; }, {"\"mlp_only_layers\"", "48"}},
      {"zero sparse step", [](json& j) { j["decoder_sparse_step"] = 0; }, {"\"decoder_sparse_step\"", "positive"}},
      {"dense layer without intermediate_size", [](json& j) { j.erase("intermediate_size"); j["mlp_only_layers"] = {0}; },
       {"\"intermediate_size\""}},
      {"moe without k", [](json& j) { j.erase("num_experts_per_tok"); }, {"\"num_experts_per_tok\""}},
      {"bad activation", [](json& j) { j["hidden_act"] = "gelu"; }, {"\"hidden_act\"", "gelu"}},
      {"bool as string", [](json& j) { j["tie_word_embeddings"] = "false"; }, {"\"tie_word_embeddings\""}},
      {"released: no text_config", [](json& j) { j.erase("text_config"); }, {"\"text_config\""}, true},
      {"released: text_config not object", [](json& j) { j["text_config"] = 1; }, {"\"text_config\""}, true},
      {"released: nested missing field", [](json& j) { j["text_config"].erase("num_experts"); },
       {"\"text_config.num_experts\""}, true},
      {"released: zero experts", [](json& j) { j["text_config"]["num_experts"] = 0; },
       {"\"text_config.num_experts\""}, true},
      {"released: nested rope", [](json& j) { j["text_config"]["rope_parameters"]["rope_theta"] = "x"; },
       {"\"text_config.rope_parameters.rope_theta\""}, true},
  };
  for (const auto& b : cases) {
    SCOPED_TRACE(b.what);
    json j = b.released ? qwen35_released() : qwen3_next_80b();
    b.edit(j);
    try {
      parse_model_config(j, "/models/x/config.json");
      ADD_FAILURE() << "accepted: " << b.what;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("/models/x/config.json"));
      for (const auto& p : b.expect) EXPECT_THAT(e.what(), HasSubstr(p));
    }
  }
  expect_error([] { parse_model_config(json::array(), "c.json"); }, {"c.json", "object"});
}

// Sizes beyond the limits are refused before they size a table or a loop (issue 16:
// num_hidden_layers 2^31 - 1 without layer_types looped and took 4.2 GB).
TEST(ConfigErrors, SizesBeyondTheLimitsAreRefused) {
  struct Case {
    const char* field;
    json value;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"num_hidden_layers", 2147483647, "\"num_hidden_layers\" is 2147483647, beyond the limit"},
      {"vocab_size", int64_t(1) << 40, "\"vocab_size\" is 1099511627776, beyond the limit"},
      {"hidden_size", uint64_t(1) << 63, "\"hidden_size\" is 9223372036854775808, too large"},
      {"num_experts", 1 << 20, "\"num_experts\" is 1048576, beyond the limit"},
      {"max_position_embeddings", int64_t(1) << 40, "beyond the limit"},
      {"rope_theta", 1e300, "\"rope_theta\" is 1e+300, not a finite float"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.field);
    json j = qwen3_next_80b();
    j[c.field] = c.value;
    expect_error([&] { parse_model_config(j, "c.json"); }, {"c.json", c.expect});
  }
}

}  // namespace
}  // namespace ballast::model
