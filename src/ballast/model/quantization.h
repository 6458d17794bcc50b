#pragma once
// A checkpoint's declared quantization (config.json "quantization_config"). ballast reads one:
// Qwen's fine-grained FP8 of the -FP8 releases (quant_method "fp8", fmt "e4m3", activation_scheme
// "dynamic", weight_block_size [128, 128]): linear weights stored as F8_E4M3 with a
// `weight_scale_inv` F32 tensor of one scale per 128 x 128 block. Anything else is refused with
// the field at fault, rather than read as plain weights (which computes wrong logits silently).
#include <regex>
#include <string>
#include <unordered_set>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ballast::model {

struct Quantization {
  bool fp8 = false;  // the fine-grained FP8 above; false: no quantization_config
  std::vector<std::string> modules_to_not_convert;

  // Whether the checkpoint may hold `module` (a full name, e.g. "model.layers.0.mlp.gate") in FP8:
  // false for a module modules_to_not_convert names. As transformers reads the list, an entry names
  // the module itself, everything under it ("entry." a prefix) or any module ending in ".entry";
  // an entry with regex syntax (* + ? ( [ { | ^ $ \) is a regex matched from the name's start.
  bool converts(const std::string& module) const;

  // modules_to_not_convert split for lookups (a release lists every norm and router: hundreds).
  std::unordered_set<std::string> plain_entries;
  std::vector<std::regex> regex_entries;
};

// Parses `q` (the value of "quantization_config"); `path` is the field's path and `source` the
// file, for messages.
Quantization parse_quantization(const nlohmann::json& q, const std::string& source, const std::string& path);

}  // namespace ballast::model
