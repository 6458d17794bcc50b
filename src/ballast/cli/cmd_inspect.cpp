// ballast inspect: what a model is and what it costs, from config.json and the checkpoint's
// headers alone (no weight is read).
#include <fmt/format.h>

#include <cctype>
#include <map>
#include <nlohmann/json.hpp>

#include "ballast/cli/commands.h"
#include "ballast/core/error.h"
#include "ballast/io/checkpoint.h"
#include "ballast/model/config.h"
#include "ballast/model/param_count.h"

namespace ballast::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using model::FfnType;
using model::LayerType;

std::string family_name(model::Family f) { return f == model::Family::Qwen3Next ? "qwen3-next" : "qwen3.5-moe"; }

// One letter per layer, in groups of four: "LLLF LLLF".
template <typename T, typename Fn>
std::string letters(const std::vector<T>& v, Fn letter) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i && i % 4 == 0) s += ' ';
    s += letter(v[i]);
  }
  return s;
}

std::string human_count(double n) {
  if (n >= 1e9) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.2f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

std::string human_bytes(double b) {
  if (b >= double(1ull << 30)) return fmt::format("{:.2f} GiB", b / double(1ull << 30));
  if (b >= double(1ull << 20)) return fmt::format("{:.2f} MiB", b / double(1ull << 20));
  if (b >= 1024) return fmt::format("{:.2f} KiB", b / 1024);
  return fmt::format("{:.0f} B", b);
}

// Which part of the model a checkpoint tensor belongs to; the vision tower of the released
// multimodal Qwen3.5 checkpoints is not part of a text engine.
enum class Part { Trunk, Mtp, Vision };
Part part_of(const std::string& name) {
  if (name.rfind("mtp.", 0) == 0) return Part::Mtp;
  if (name.rfind("model.visual.", 0) == 0 || name.rfind("visual.", 0) == 0) return Part::Vision;
  return Part::Trunk;
}

bool is_scale(const std::string& name) {
  const std::string tail = "_scale_inv";
  return name.size() > tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
}

// A tensor's kind, its name without the layer and expert indices: "model.layers.3.mlp.experts.7.
// gate_proj.weight" -> "mlp.experts.gate_proj.weight"; MTP tensors keep their "mtp." prefix.
std::string kind_of(const std::string& name) {
  std::string s = name;
  const bool mtp = s.rfind("mtp.", 0) == 0;
  if (const size_t at = s.find("layers."); at != std::string::npos) {
    const size_t dot = s.find('.', at + 7);
    if (dot != std::string::npos) s = s.substr(dot + 1);
  } else {
    for (const char* p : {"model.language_model.", "model.", "mtp."})
      if (s.rfind(p, 0) == 0) {
        s = s.substr(std::string(p).size());
        break;
      }
  }
  if (const size_t at = s.find("experts."); at != std::string::npos) {
    const size_t dot = s.find('.', at + 8);
    if (dot != std::string::npos && std::isdigit(static_cast<unsigned char>(s[at + 8]))) s.erase(at + 8, dot - at - 7);
  }
  return mtp ? "mtp." + s : s;
}

json describe(const fs::path& dir) {
  const auto c = model::load_model_config(dir);
  const auto p = model::count_parameters(c);
  json j;
  j["model"] = dir.string();
  j["architecture"] = c.architecture;
  j["family"] = family_name(c.family);
  j["model_type"] = c.model_type;

  j["layers"] = {
      {"count", c.num_layers},
      {"linear_attention", c.num_linear_attention_layers()},
      {"full_attention", c.num_full_attention_layers()},
      {"types", letters(c.layer_types, [](LayerType t) { return t == LayerType::FullAttention ? 'F' : 'L'; })},
      {"moe", c.num_moe_layers()},
      {"dense", c.num_layers - c.num_moe_layers()},
      {"ffn_types", letters(c.ffn_types, [](FfnType t) { return t == FfnType::Moe ? 'M' : 'D'; })},
      {"mtp", c.mtp_num_hidden_layers},
  };
  j["dims"] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"rms_norm_eps", c.rms_norm_eps},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"attention",
       {{"num_heads", c.num_heads}, {"num_kv_heads", c.num_kv_heads}, {"head_dim", c.head_dim},
        {"rotary_dim", c.rotary_dim()}, {"rope_theta", c.rope_theta}}},
      {"deltanet",
       {{"num_key_heads", c.linear_num_key_heads}, {"num_value_heads", c.linear_num_value_heads},
        {"key_head_dim", c.linear_key_head_dim}, {"value_head_dim", c.linear_value_head_dim},
        {"conv_kernel", c.linear_conv_kernel_dim}}},
      {"moe",
       {{"num_experts", c.num_experts}, {"num_experts_per_tok", c.num_experts_per_tok},
        {"moe_intermediate_size", c.moe_intermediate_size},
        {"shared_expert_intermediate_size", c.shared_expert_intermediate_size},
        {"norm_topk_prob", c.norm_topk_prob}}},
      {"intermediate_size", c.intermediate_size},
  };
  j["parameters"] = {
      {"total", p.total()},
      {"active_per_token", p.active_per_token()},
      {"active_per_token_without_embeddings", p.active_per_token() - p.embedding - p.lm_head},
      {"mtp", p.mtp},
      {"mtp_active_per_token", p.mtp_active},
      {"breakdown",
       {{"embedding", p.embedding}, {"lm_head", p.lm_head}, {"norms", p.norms}, {"attention", p.attention},
        {"deltanet", p.deltanet}, {"dense_mlp", p.dense_mlp}, {"router", p.router},
        {"routed_experts", p.routed_experts}, {"shared_experts", p.shared_experts}}},
  };
  j["state"] = {
      {"kv_bytes_per_token_bf16", model::kv_bytes_per_token(c, 2)},
      {"kv_bytes_per_token_f32", model::kv_bytes_per_token(c, 4)},
      {"mtp_kv_bytes_per_token_bf16", model::mtp_kv_bytes_per_token(c, 2)},
      {"deltanet_state_bytes_per_sequence", model::deltanet_state_bytes(c, 4)},
  };

  // The checkpoint, if the directory has one: sizes from the headers, checked against the config.
  std::error_code ec;
  const bool has_weights = fs::is_regular_file(dir, ec) || fs::exists(dir / "model.safetensors", ec) ||
                           fs::exists(dir / "model.safetensors.index.json", ec);
  if (!has_weights) {
    j["checkpoint"] = nullptr;
    return j;
  }
  const auto ck = io::Checkpoint::open(dir);
  std::map<std::string, json> dtypes;
  int64_t params[3] = {0, 0, 0};
  uint64_t bytes[3] = {0, 0, 0};
  // FP8 weights by kind, their scales, and the kinds of 2-d weights kept in a float dtype.
  std::map<std::string, json> fp8_kinds, kept_kinds;
  uint64_t fp8_bytes = 0, scale_bytes = 0;
  int64_t fp8_tensors = 0, scale_tensors = 0;
  for (const auto& name : ck.names()) {
    const auto& t = ck.info(name);
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    const int part = int(part_of(name));
    bytes[part] += t.nbytes();
    auto& d = dtypes[std::string(dtype_name(t.dtype))];
    if (d.is_null()) d = {{"tensors", 0}, {"bytes", uint64_t(0)}};
    d["tensors"] = d["tensors"].get<int64_t>() + 1;
    d["bytes"] = d["bytes"].get<uint64_t>() + t.nbytes();
    if (is_scale(name)) {  // quantization scales are no parameters of the model
      if (part_of(name) != Part::Vision) ++scale_tensors, scale_bytes += t.nbytes();
      continue;
    }
    params[part] += n;
    if (part_of(name) == Part::Vision || t.shape.size() < 2) continue;
    auto& k = (t.dtype == DType::F8_E4M3 ? fp8_kinds : kept_kinds)[kind_of(name)];
    if (k.is_null()) k = {{"tensors", 0}, {"bytes", uint64_t(0)}, {"dtype", std::string(dtype_name(t.dtype))}};
    k["tensors"] = k["tensors"].get<int64_t>() + 1;
    k["bytes"] = k["bytes"].get<uint64_t>() + t.nbytes();
    if (t.dtype == DType::F8_E4M3) ++fp8_tensors, fp8_bytes += t.nbytes();
  }
  if (c.quant.fp8 || fp8_tensors > 0)
    j["quantization"] = {
        {"method", c.quant.fp8 ? "fp8" : "none declared"},
        {"format", "e4m3, one F32 scale (weight_scale_inv) per 128 x 128 block, dynamic activations"},
        {"block", {kScaleBlock, kScaleBlock}},
        {"modules_to_not_convert", c.quant.modules_to_not_convert.size()},
        {"fp8_tensors", fp8_tensors},
        {"fp8_bytes", fp8_bytes},
        {"scale_tensors", scale_tensors},
        {"scale_bytes", scale_bytes},
        {"fp8_kinds", fp8_kinds},
        {"unquantized_kinds", kept_kinds},
    };
  j["checkpoint"] = {
      {"files", ck.files().size()},
      {"tensors", ck.size()},
      {"dtypes", dtypes},
      {"trunk_parameters", params[0]},
      {"mtp_parameters", params[1]},
      {"vision_parameters", params[2]},
      {"trunk_bytes", bytes[0]},
      {"mtp_bytes", bytes[1]},
      {"vision_bytes", bytes[2]},
      // What serving the text model needs for its weights, as stored.
      {"weight_bytes", bytes[0] + bytes[1]},
      {"trunk_matches_config", params[0] == p.total()},
      {"mtp_matches_config", p.mtp == 0 || params[1] == p.mtp},
  };
  return j;
}

void print_text(const json& j) {
  const auto& L = j["layers"];
  const auto& D = j["dims"];
  const auto& A = D["attention"];
  const auto& N = D["deltanet"];
  const auto& M = D["moe"];
  const auto& P = j["parameters"];
  const auto& B = P["breakdown"];
  const auto& S = j["state"];
  auto cnt = [](const json& v) { return human_count(v.get<double>()); };
  auto byt = [](const json& v) { return human_bytes(v.get<double>()); };

  fmt::print("model         {}\n", j["model"].get<std::string>());
  fmt::print("architecture  {} ({}, model_type {})\n", j["architecture"].get<std::string>(),
             j["family"].get<std::string>(), j["model_type"].get<std::string>());
  fmt::print("layers        {}: {} Gated DeltaNet (L) + {} full attention (F){}\n", L["count"].get<int>(),
             L["linear_attention"].get<int>(), L["full_attention"].get<int>(),
             L["mtp"].get<int>() ? fmt::format(", MTP head of {} layer(s)", L["mtp"].get<int>()) : "");
  fmt::print("              {}\n", L["types"].get<std::string>());
  fmt::print("ffn           {} MoE (M) + {} dense (D)\n", L["moe"].get<int>(), L["dense"].get<int>());
  fmt::print("              {}\n", L["ffn_types"].get<std::string>());
  fmt::print("dims          H={} vocab={} eps={:g}{}\n", D["hidden_size"].get<int>(), D["vocab_size"].get<int>(),
             D["rms_norm_eps"].get<double>(), D["tie_word_embeddings"].get<bool>() ? " tied embeddings" : "");
  fmt::print("attention     Hq={} Hkv={} hd={} rope dims={} theta={:g}\n", A["num_heads"].get<int>(),
             A["num_kv_heads"].get<int>(), A["head_dim"].get<int>(), A["rotary_dim"].get<int>(),
             A["rope_theta"].get<double>());
  if (L["linear_attention"].get<int>() > 0)
    fmt::print("deltanet      Hk={} Hv={} dk={} dv={} conv kernel={}\n", N["num_key_heads"].get<int>(),
               N["num_value_heads"].get<int>(), N["key_head_dim"].get<int>(), N["value_head_dim"].get<int>(),
               N["conv_kernel"].get<int>());
  if (L["moe"].get<int>() > 0)
    fmt::print("moe           E={} k={} I={} shared I={} norm_topk_prob={}\n", M["num_experts"].get<int>(),
               M["num_experts_per_tok"].get<int>(), M["moe_intermediate_size"].get<int>(),
               M["shared_expert_intermediate_size"].get<int>(), M["norm_topk_prob"].get<bool>());
  if (L["dense"].get<int>() > 0) fmt::print("dense mlp     I={}\n", D["intermediate_size"].get<int>());

  fmt::print("parameters    total {} ({}), active per token {} ({} without embeddings)\n", cnt(P["total"]),
             P["total"].get<int64_t>(), cnt(P["active_per_token"]), cnt(P["active_per_token_without_embeddings"]));
  fmt::print("              embedding {}, lm_head {}, attention {}, deltanet {}, routed experts {}, shared "
             "experts {}, router {}, dense {}, norms {}\n",
             cnt(B["embedding"]), cnt(B["lm_head"]), cnt(B["attention"]), cnt(B["deltanet"]),
             cnt(B["routed_experts"]), cnt(B["shared_experts"]), cnt(B["router"]), cnt(B["dense_mlp"]),
             cnt(B["norms"]));
  if (P["mtp"].get<int64_t>() > 0)
    fmt::print("              MTP head {} (active {})\n", cnt(P["mtp"]), cnt(P["mtp_active_per_token"]));

  fmt::print("kv cache      {} per token (bf16; {} fp32){}\n", byt(S["kv_bytes_per_token_bf16"]),
             byt(S["kv_bytes_per_token_f32"]),
             S["mtp_kv_bytes_per_token_bf16"].get<int64_t>()
                 ? fmt::format(", MTP +{}", human_bytes(S["mtp_kv_bytes_per_token_bf16"].get<double>()))
                 : "");
  if (L["linear_attention"].get<int>() > 0)
    fmt::print("deltanet      {} state per sequence (fp32 recurrent + conv)\n",
               byt(S["deltanet_state_bytes_per_sequence"]));

  if (j.contains("quantization")) {
    const auto& Q = j["quantization"];
    fmt::print("quantization  {}: {}; {} FP8 tensors ({}) + {} scale tensors ({}), {} modules kept unquantized\n",
               Q["method"].get<std::string>(), Q["format"].get<std::string>(), Q["fp8_tensors"].get<int64_t>(),
               byt(Q["fp8_bytes"]), Q["scale_tensors"].get<int64_t>(), byt(Q["scale_bytes"]),
               Q["modules_to_not_convert"].get<size_t>());
    for (const auto& [kind, v] : Q["fp8_kinds"].items())
      fmt::print("  fp8         {:<48} {:>6} tensors {:>12}\n", kind, v["tensors"].get<int64_t>(), byt(v["bytes"]));
    for (const auto& [kind, v] : Q["unquantized_kinds"].items())
      fmt::print("  {:<11} {:<48} {:>6} tensors {:>12}\n", v["dtype"].get<std::string>(), kind,
                 v["tensors"].get<int64_t>(), byt(v["bytes"]));
  }
  const auto& C = j["checkpoint"];
  if (C.is_null()) {
    fmt::print("checkpoint    none (no model.safetensors or index); weights at bf16 would need {}\n",
               human_bytes(double(P["total"].get<int64_t>() + P["mtp"].get<int64_t>()) * 2));
    return;
  }
  std::string dt;
  for (const auto& [name, d] : C["dtypes"].items())
    dt += fmt::format("{}{} {} ({})", dt.empty() ? "" : ", ", d["tensors"].get<int>(), name, byt(d["bytes"]));
  fmt::print("checkpoint    {} tensors in {} file(s): {}\n", C["tensors"].get<int>(), C["files"].get<int>(), dt);
  fmt::print("weights       {} in memory{}{}\n", byt(C["weight_bytes"]),
             C["mtp_bytes"].get<uint64_t>()
                 ? fmt::format(" (trunk {}, MTP {})", human_bytes(C["trunk_bytes"].get<double>()),
                               human_bytes(C["mtp_bytes"].get<double>()))
                 : "",
             C["vision_parameters"].get<int64_t>()
                 ? fmt::format("; vision tower {} ignored", human_bytes(C["vision_bytes"].get<double>()))
                 : "");
  const bool ok = C["trunk_matches_config"].get<bool>();
  fmt::print("cross-check   trunk: config {} vs checkpoint {} parameters: {}\n", P["total"].get<int64_t>(),
             C["trunk_parameters"].get<int64_t>(), ok ? "match" : "MISMATCH");
  if (P["mtp"].get<int64_t>() > 0 || C["mtp_parameters"].get<int64_t>() > 0)
    fmt::print("              mtp: config {} vs checkpoint {} parameters: {}\n", P["mtp"].get<int64_t>(),
               C["mtp_parameters"].get<int64_t>(), C["mtp_matches_config"].get<bool>() ? "match" : "MISMATCH");
}

}  // namespace

void add_inspect(CLI::App& app, Runner& run) {
  auto* cmd = app.add_subcommand("inspect", "Show a model's architecture, parameter counts and memory needs");
  struct Args {
    std::string model;
    bool json = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--model", args->model, "Model directory (config.json + safetensors)")->required();
  cmd->add_flag("--json", args->json, "Print one JSON object");
  cmd->callback([&run, args] {
    run = [args] {
      const json j = describe(args->model);
      if (args->json) fmt::print("{}\n", j.dump(2));
      else print_text(j);
      return 0;
    };
  });
}

}  // namespace ballast::cli
