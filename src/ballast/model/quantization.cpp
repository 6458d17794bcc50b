#include "ballast/model/quantization.h"

#include <nlohmann/json.hpp>
#include <regex>

#include "ballast/core/error.h"

namespace ballast::model {

using nlohmann::json;

namespace {

bool has_regex_syntax(const std::string& p) { return p.find_first_of("*+?()[]{}|^$\\") != std::string::npos; }

}  // namespace

bool Quantization::converts(const std::string& module) const {
  // The module, every dotted prefix of it and every dotted suffix, looked up.
  if (plain_entries.count(module)) return false;
  for (size_t dot = module.find('.'); dot != std::string::npos; dot = module.find('.', dot + 1))
    if (plain_entries.count(module.substr(0, dot)) || plain_entries.count(module.substr(dot + 1))) return false;
  for (const auto& r : regex_entries)
    if (std::regex_search(module, r, std::regex_constants::match_continuous)) return false;
  return true;
}

Quantization parse_quantization(const json& q, const std::string& source, const std::string& path) {
  Quantization out;
  if (q.is_null()) return out;
  check(q.is_object(), "{}: field \"{}\" must be an object, got {}", source, path, q.dump());
  auto field = [&](const char* k) { return path + "." + k; };
  auto string_field = [&](const char* k, const std::string& dflt) {
    if (!q.contains(k) || q[k].is_null()) return dflt;
    check(q[k].is_string(), "{}: field \"{}\" must be a string, got {}", source, field(k), q[k].dump());
    return q[k].get<std::string>();
  };
  check(q.contains("quant_method"), "{}: field \"{}\" is missing: which quantization the checkpoint holds is unknown",
        source, field("quant_method"));
  const std::string method = string_field("quant_method", "");
  check(method == "fp8",
        "{}: field \"{}\": quantization \"{}\" is not supported (ballast reads \"fp8\": Qwen's fine-grained FP8, "
        "e4m3 weights with one scale per 128 x 128 block)",
        source, field("quant_method"), method);
  // Every key of transformers' FineGrainedFP8Config and of the releases; an unknown one might
  // change what the weights mean.
  for (const auto& [k, v] : q.items())
    check(k == "quant_method" || k == "fmt" || k == "activation_scheme" || k == "weight_block_size" ||
              k == "modules_to_not_convert" || k == "dequantize" || k == "scale_fmt",
          "{}: field \"{}.{}\" is not understood by ballast (it reads quant_method, fmt, activation_scheme, "
          "weight_block_size, modules_to_not_convert, dequantize, scale_fmt)",
          source, path, k);
  const std::string fmt = string_field("fmt", "e4m3");
  check(fmt == "e4m3", "{}: field \"{}\": FP8 format \"{}\" is not supported (only e4m3)", source, field("fmt"), fmt);
  const std::string act = string_field("activation_scheme", "dynamic");
  check(act == "dynamic",
        "{}: field \"{}\": \"{}\" activation scales are not supported (only \"dynamic\": activations stay float "
        "on the CPU)",
        source, field("activation_scheme"), act);
  const std::string scale_fmt = string_field("scale_fmt", "float");
  check(scale_fmt == "float", "{}: field \"{}\": scales stored as \"{}\" are not supported (only float)", source,
        field("scale_fmt"), scale_fmt);
  if (q.contains("dequantize"))
    check(q["dequantize"].is_boolean(), "{}: field \"{}\" must be true or false, got {}", source, field("dequantize"),
          q["dequantize"].dump());
  // transformers' default block is [128, 128]; null would mean one scale per tensor.
  if (q.contains("weight_block_size")) {
    const json& b = q["weight_block_size"];
    const bool ok = b.is_array() && b.size() == 2 && b[0].is_number_integer() && b[1].is_number_integer() &&
                    b[0].get<int64_t>() == 128 && b[1].get<int64_t>() == 128;
    check(ok,
          "{}: field \"{}\": {} is not supported (only [128, 128]: one scale per 128 x 128 block{})", source,
          field("weight_block_size"), b.dump(), b.is_null() ? "; null means one scale per tensor" : "");
  }
  if (q.contains("modules_to_not_convert") && !q["modules_to_not_convert"].is_null()) {
    const json& m = q["modules_to_not_convert"];
    check(m.is_array(), "{}: field \"{}\" must be an array of module names, got {}", source,
          field("modules_to_not_convert"), m.dump());
    for (size_t i = 0; i < m.size(); ++i) {
      check(m[i].is_string(), "{}: field \"{}[{}]\" must be a module name, got {}", source,
            field("modules_to_not_convert"), i, m[i].dump());
      const std::string p = m[i].get<std::string>();
      if (has_regex_syntax(p)) {
        try {
          out.regex_entries.emplace_back(p);
        } catch (const std::regex_error& e) {
          fail("{}: field \"{}[{}]\": \"{}\" is not a valid regex: {}", source, field("modules_to_not_convert"), i, p,
               e.what());
        }
      } else {
        out.plain_entries.insert(p);
      }
      out.modules_to_not_convert.push_back(p);
    }
  }
  out.fp8 = true;
  return out;
}

}  // namespace ballast::model
