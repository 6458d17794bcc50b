#include "ballast/model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "ballast/core/error.h"

namespace ballast::model {

using nlohmann::json;

int ModelConfig::num_full_attention_layers() const {
  return int(std::count(layer_types.begin(), layer_types.end(), LayerType::FullAttention));
}
int ModelConfig::num_linear_attention_layers() const {
  return int(std::count(layer_types.begin(), layer_types.end(), LayerType::LinearAttention));
}
int ModelConfig::num_moe_layers() const {
  return int(std::count(ffn_types.begin(), ffn_types.end(), FfnType::Moe));
}

namespace {

// Typed field access over one JSON object; every error names the file and the full field path
// (e.g. "text_config.hidden_size").
class Fields {
 public:
  Fields(const json& obj, std::string source, std::string prefix)
      : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)) {}

  std::string path(const std::string& key) const { return prefix_ + key; }
  bool has(const std::string& key) const { return obj_.contains(key) && !obj_[key].is_null(); }
  const json& raw(const std::string& key) const { return obj_[key]; }

  int64_t integer(const std::string& key) const {
    check(has(key), "{}: missing required field \"{}\"", source_, path(key));
    return as_int(obj_[key], path(key));
  }
  int64_t integer(const std::string& key, int64_t dflt) const {
    return has(key) ? as_int(obj_[key], path(key)) : dflt;
  }
  int64_t positive(const std::string& key) const {
    int64_t v = integer(key);
    check(v > 0, "{}: field \"{}\" must be positive, got {}", source_, path(key), v);
    return v;
  }
  int64_t positive(const std::string& key, int64_t dflt) const {
    int64_t v = integer(key, dflt);
    check(v > 0, "{}: field \"{}\" must be positive, got {}", source_, path(key), v);
    return v;
  }
  int64_t non_negative(const std::string& key) const {
    int64_t v = integer(key);
    check(v >= 0, "{}: field \"{}\" must be >= 0, got {}", source_, path(key), v);
    return v;
  }
  double number(const std::string& key, double dflt) const {
    if (!has(key)) return dflt;
    check(obj_[key].is_number(), "{}: field \"{}\" must be a number, got {}", source_, path(key),
          obj_[key].dump());
    const double v = obj_[key].get<double>();
    check(std::isfinite(v) && std::abs(v) <= 3e38, "{}: field \"{}\" is {}, not a finite float", source_,
          path(key), v);
    return v;
  }
  bool boolean(const std::string& key, bool dflt) const {
    if (!has(key)) return dflt;
    check(obj_[key].is_boolean(), "{}: field \"{}\" must be true or false, got {}", source_, path(key),
          obj_[key].dump());
    return obj_[key].get<bool>();
  }
  std::string string(const std::string& key, const std::string& dflt) const {
    if (!has(key)) return dflt;
    check(obj_[key].is_string(), "{}: field \"{}\" must be a string, got {}", source_, path(key),
          obj_[key].dump());
    return obj_[key].get<std::string>();
  }
  // A nested object (or nullptr when absent/null).
  const json* object(const std::string& key) const {
    if (!has(key)) return nullptr;
    check(obj_[key].is_object(), "{}: field \"{}\" must be an object, got {}", source_, path(key),
          obj_[key].dump());
    return &obj_[key];
  }

  const std::string& source() const { return source_; }

 private:
  int64_t as_int(const json& v, const std::string& p) const {
    check(v.is_number_integer(), "{}: field \"{}\" must be an integer, got {}", source_, p, v.dump());
    check(!v.is_number_unsigned() || v.get<uint64_t>() <= uint64_t(INT64_MAX), "{}: field \"{}\" is {}, too large",
          source_, p, v.dump());
    return v.get<int64_t>();
  }

  const json& obj_;
  std::string source_;
  std::string prefix_;
};

// Bounds on config.json's sizes, far above the largest published models (vocab 248320, hidden
// 8192, 94 layers, 512 experts, 262144 positions), so that a corrupted number is refused before it
// sizes a table or a loop.
constexpr int64_t kMaxVocab = int64_t(1) << 22;
constexpr int64_t kMaxWidth = int64_t(1) << 20;   // hidden and intermediate sizes
constexpr int64_t kMaxLayers = 1 << 12;
constexpr int64_t kMaxHeads = 1 << 12;            // heads and head dims
constexpr int64_t kMaxExperts = 1 << 14;
constexpr int64_t kMaxPositions = int64_t(1) << 26;

int to_int(int64_t v, const Fields& f, const char* key, int64_t limit = INT32_MAX) {
  check(v <= limit, "{}: field \"{}\" is {}, beyond the limit of {}", f.source(), f.path(key), v, limit);
  return int(v);
}

// rope_theta / partial_rotary_factor live at the top level (transformers v4 configs) or inside
// rope_parameters (v5) or rope_scaling. v5 saves both and reads rope_parameters (a v5-saved
// Qwen3.5 config has a stale top-level partial_rotary_factor 0.25 beside 0.5 inside), so the
// nested value wins and the top level only fills in what is missing.
void parse_rope(const Fields& f, ModelConfig& c) {
  // transformers' defaults for both families.
  c.rope_theta = f.number("rope_theta", 10000.0);
  c.partial_rotary_factor = float(f.number("partial_rotary_factor", 0.25));
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    const json* r = f.object(key);
    if (!r) continue;
    Fields rf(*r, f.source(), f.path(key) + ".");
    // M-RoPE ("mrope_section") reduces to plain RoPE for text-only input; other scalings change
    // the frequencies and are not implemented.
    std::string type = rf.string("rope_type", rf.string("type", "default"));
    check(type == "default" || type == "mrope", "{}: field \"{}\": unsupported rope_type \"{}\"",
          f.source(), rf.path("rope_type"), type);
    c.rope_theta = rf.number("rope_theta", c.rope_theta);
    c.partial_rotary_factor = float(rf.number("partial_rotary_factor", c.partial_rotary_factor));
  }
  check(c.rope_theta > 0, "{}: field \"{}\" must be positive", f.source(), f.path("rope_theta"));
  check(c.partial_rotary_factor > 0 && c.partial_rotary_factor <= 1,
        "{}: field \"{}\" must be in (0, 1], got {}", f.source(), f.path("partial_rotary_factor"),
        c.partial_rotary_factor);
  check(c.rotary_dim() > 0 && c.rotary_dim() % 2 == 0,
        "{}: field \"{}\": head_dim {} x partial_rotary_factor {} gives rotary dim {}, which must be "
        "even and positive",
        f.source(), f.path("partial_rotary_factor"), c.head_dim, c.partial_rotary_factor,
        c.rotary_dim());
}

void parse_layer_types(const Fields& f, ModelConfig& c) {
  c.layer_types.clear();
  if (f.has("layer_types")) {
    const json& lt = f.raw("layer_types");
    check(lt.is_array(), "{}: field \"{}\" must be an array of strings", f.source(), f.path("layer_types"));
    check(int64_t(lt.size()) == c.num_layers,
          "{}: field \"{}\" has {} entries but num_hidden_layers is {}", f.source(),
          f.path("layer_types"), lt.size(), c.num_layers);
    for (size_t i = 0; i < lt.size(); ++i) {
      const std::string s = lt[i].is_string() ? lt[i].get<std::string>() : lt[i].dump();
      if (s == "linear_attention") c.layer_types.push_back(LayerType::LinearAttention);
      else if (s == "full_attention") c.layer_types.push_back(LayerType::FullAttention);
      else
        fail("{}: field \"{}[{}]\": unknown layer type {} (expected \"linear_attention\" or "
             "\"full_attention\")",
             f.source(), f.path("layer_types"), i, s);
    }
    return;
  }
  const int64_t interval = f.positive("full_attention_interval", 4);
  for (int i = 0; i < c.num_layers; ++i)
    c.layer_types.push_back((i + 1) % interval == 0 ? LayerType::FullAttention
                                                    : LayerType::LinearAttention);
}

void parse_ffn_types(const Fields& f, ModelConfig& c) {
  c.ffn_types.assign(size_t(c.num_layers), FfnType::Moe);
  if (c.family == Family::Qwen35Moe) {
    c.num_experts = to_int(f.positive("num_experts"), f, "num_experts", kMaxExperts);
    c.norm_topk_prob = true;  // Qwen3.5 always renormalises the top-k weights
    return;
  }
  c.num_experts = to_int(f.non_negative("num_experts"), f, "num_experts", kMaxExperts);
  c.norm_topk_prob = f.boolean("norm_topk_prob", true);
  const int64_t step = f.positive("decoder_sparse_step", 1);
  std::set<int64_t> mlp_only;
  if (f.has("mlp_only_layers")) {
    const json& m = f.raw("mlp_only_layers");
    check(m.is_array(), "{}: field \"{}\" must be an array of layer indices", f.source(),
          f.path("mlp_only_layers"));
    for (const auto& x : m) {
      check(x.is_number_integer() && x.get<int64_t>() >= 0 && x.get<int64_t>() < c.num_layers,
            "{}: field \"{}\": {} is not a layer index in [0, {})", f.source(), f.path("mlp_only_layers"),
            x.dump(), c.num_layers);
      mlp_only.insert(x.get<int64_t>());
    }
  }
  for (int i = 0; i < c.num_layers; ++i) {
    bool moe = !mlp_only.count(i) && c.num_experts > 0 && (i + 1) % step == 0;
    c.ffn_types[size_t(i)] = moe ? FfnType::Moe : FfnType::Dense;
  }
}

ModelConfig parse_text(const Fields& f, ModelConfig c) {
  const std::string& src = f.source();
  std::string act = f.string("hidden_act", "silu");
  check(act == "silu", "{}: field \"{}\": unsupported activation \"{}\" (only silu)", src,
        f.path("hidden_act"), act);

  c.vocab_size = to_int(f.positive("vocab_size"), f, "vocab_size", kMaxVocab);
  c.hidden_size = to_int(f.positive("hidden_size"), f, "hidden_size", kMaxWidth);
  c.num_layers = to_int(f.positive("num_hidden_layers"), f, "num_hidden_layers", kMaxLayers);
  c.rms_norm_eps = float(f.number("rms_norm_eps", 1e-6));
  check(c.rms_norm_eps > 0, "{}: field \"{}\" must be positive", src, f.path("rms_norm_eps"));
  c.max_position_embeddings = to_int(f.integer("max_position_embeddings", 0), f, "max_position_embeddings", kMaxPositions);
  check(c.max_position_embeddings >= 0, "{}: field \"{}\" must be >= 0", src, f.path("max_position_embeddings"));
  c.mtp_num_hidden_layers = to_int(f.integer("mtp_num_hidden_layers", 0), f, "mtp_num_hidden_layers", kMaxLayers);
  check(c.mtp_num_hidden_layers >= 0, "{}: field \"{}\" must be >= 0", src, f.path("mtp_num_hidden_layers"));

  parse_layer_types(f, c);
  parse_ffn_types(f, c);

  // Gated full attention.
  c.num_heads = to_int(f.positive("num_attention_heads"), f, "num_attention_heads", kMaxHeads);
  c.num_kv_heads = to_int(f.positive("num_key_value_heads"), f, "num_key_value_heads", kMaxHeads);
  check(c.num_heads % c.num_kv_heads == 0,
        "{}: field \"{}\": num_attention_heads {} is not a multiple of num_key_value_heads {}", src,
        f.path("num_key_value_heads"), c.num_heads, c.num_kv_heads);
  c.head_dim = to_int(f.positive("head_dim", c.hidden_size / c.num_heads), f, "head_dim", kMaxHeads);
  parse_rope(f, c);

  // Gated DeltaNet: needed only if some layer uses it.
  if (c.num_linear_attention_layers() > 0) {
    c.linear_num_key_heads = to_int(f.positive("linear_num_key_heads"), f, "linear_num_key_heads", kMaxHeads);
    c.linear_num_value_heads = to_int(f.positive("linear_num_value_heads"), f, "linear_num_value_heads", kMaxHeads);
    c.linear_key_head_dim = to_int(f.positive("linear_key_head_dim"), f, "linear_key_head_dim", kMaxHeads);
    c.linear_value_head_dim = to_int(f.positive("linear_value_head_dim"), f, "linear_value_head_dim", kMaxHeads);
    c.linear_conv_kernel_dim = to_int(f.positive("linear_conv_kernel_dim", 4), f, "linear_conv_kernel_dim", kMaxHeads);
    check(c.linear_num_value_heads % c.linear_num_key_heads == 0,
          "{}: field \"{}\": linear_num_value_heads {} is not a multiple of linear_num_key_heads {}", src,
          f.path("linear_num_value_heads"), c.linear_num_value_heads, c.linear_num_key_heads);
  }

  // Sparse MoE: needed only if some layer uses it (MTP layers are MoE too).
  if (c.num_moe_layers() > 0 || (c.mtp_num_hidden_layers > 0 && c.num_experts > 0)) {
    c.num_experts_per_tok = to_int(f.positive("num_experts_per_tok"), f, "num_experts_per_tok");
    check(c.num_experts_per_tok <= c.num_experts,
          "{}: field \"{}\": num_experts_per_tok {} exceeds num_experts {}", src,
          f.path("num_experts_per_tok"), c.num_experts_per_tok, c.num_experts);
    c.moe_intermediate_size = to_int(f.positive("moe_intermediate_size"), f, "moe_intermediate_size", kMaxWidth);
    c.shared_expert_intermediate_size =
        to_int(f.non_negative("shared_expert_intermediate_size"), f, "shared_expert_intermediate_size", kMaxWidth);
  }
  if (std::count(c.ffn_types.begin(), c.ffn_types.end(), FfnType::Dense) > 0)
    c.intermediate_size = to_int(f.positive("intermediate_size"), f, "intermediate_size", kMaxWidth);
  return c;
}

}  // namespace

namespace {

ModelConfig parse_architecture(const json& j, const std::string& source) {
  Fields top(j, source, "");
  ModelConfig c;

  std::string arch;
  if (top.has("architectures")) {
    const json& a = top.raw("architectures");
    check(a.is_array() && !a.empty() && a[0].is_string(),
          "{}: field \"architectures\" must be a non-empty array of strings", source);
    arch = a[0].get<std::string>();
  }
  const std::string model_type = top.string("model_type", "");
  // Without "architectures", model_type alone decides.
  if (arch.empty()) {
    if (model_type == "qwen3_next") arch = "Qwen3NextForCausalLM";
    else if (model_type == "qwen3_5_moe_text") arch = "Qwen3_5MoeForCausalLM";
    else if (model_type == "qwen3_5_moe") arch = "Qwen3_5MoeForConditionalGeneration";
    else
      fail("{}: field \"architectures\" missing and model_type \"{}\" is not supported (expected "
           "qwen3_next, qwen3_5_moe_text or qwen3_5_moe)",
           source, model_type);
  }
  c.architecture = arch;

  if (arch == "Qwen3NextForCausalLM") {
    check(model_type.empty() || model_type == "qwen3_next",
          "{}: field \"model_type\": \"{}\" does not match architecture {} (expected qwen3_next)", source,
          model_type, arch);
    c.family = Family::Qwen3Next;
    c.model_type = "qwen3_next";
    c.tie_word_embeddings = top.boolean("tie_word_embeddings", false);
    return parse_text(top, c);
  }
  if (arch == "Qwen3_5MoeForCausalLM") {
    check(model_type.empty() || model_type == "qwen3_5_moe_text",
          "{}: field \"model_type\": \"{}\" does not match architecture {} (expected qwen3_5_moe_text)",
          source, model_type, arch);
    c.family = Family::Qwen35Moe;
    c.model_type = "qwen3_5_moe_text";
    c.tie_word_embeddings = top.boolean("tie_word_embeddings", false);
    return parse_text(top, c);
  }
  if (arch == "Qwen3_5MoeForConditionalGeneration") {
    check(model_type.empty() || model_type == "qwen3_5_moe",
          "{}: field \"model_type\": \"{}\" does not match architecture {} (expected qwen3_5_moe)",
          source, model_type, arch);
    const json* text = top.object("text_config");
    check(text != nullptr, "{}: missing required field \"text_config\"", source);
    Fields tf(*text, source, "text_config.");
    c.family = Family::Qwen35Moe;
    c.model_type = tf.string("model_type", "qwen3_5_moe_text");
    check(c.model_type == "qwen3_5_moe_text",
          "{}: field \"text_config.model_type\": \"{}\" is not qwen3_5_moe_text", source, c.model_type);
    // The multimodal wrapper usually carries tie_word_embeddings at the top; text_config wins.
    c.tie_word_embeddings = tf.boolean("tie_word_embeddings", top.boolean("tie_word_embeddings", false));
    ModelConfig out = parse_text(tf, c);
    if (!tf.has("mtp_num_hidden_layers"))
      out.mtp_num_hidden_layers = to_int(top.integer("mtp_num_hidden_layers", 0), top, "mtp_num_hidden_layers", kMaxLayers);
    return out;
  }
  fail("{}: field \"architectures\": unsupported architecture \"{}\" (supported: Qwen3NextForCausalLM, "
       "Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration)",
       source, arch);
}

}  // namespace

ModelConfig parse_model_config(const json& j, const std::string& source) {
  check(j.is_object(), "{}: config must be a JSON object, got {}", source, j.type_name());
  ModelConfig c = parse_architecture(j, source);
  // The releases put quantization_config at the top level (beside text_config in Qwen3.5's).
  const bool top = j.contains("quantization_config");
  const bool nested = j.contains("text_config") && j["text_config"].is_object() &&
                      j["text_config"].contains("quantization_config");
  check(!(top && nested), "{}: both \"quantization_config\" and \"text_config.quantization_config\" are given", source);
  if (top) c.quant = parse_quantization(j["quantization_config"], source, "quantization_config");
  if (nested)
    c.quant = parse_quantization(j["text_config"]["quantization_config"], source, "text_config.quantization_config");
  return c;
}

ModelConfig load_model_config(const std::filesystem::path& dir_or_file) {
  std::filesystem::path p = dir_or_file;
  if (p.extension() != ".json") p /= "config.json";  // a model directory
  const std::string src = p.string();
  std::ifstream in(p);
  check(bool(in), "{}: cannot open config", src);
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {  // out_of_range too: a number beyond a double
    fail("{}: malformed JSON: {}", src, e.what());
  }
  return parse_model_config(j, src);
}

}  // namespace ballast::model
