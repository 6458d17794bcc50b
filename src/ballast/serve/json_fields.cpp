#include "ballast/serve/json_fields.h"

#include <fmt/format.h>

#include <cmath>

#include "ballast/text/utf8.h"

namespace ballast::serve {

namespace {
const nlohmann::json kNull;
}

nlohmann::json parse_request_body(std::string_view body) {
  // JSON is UTF-8 (RFC 8259); nlohmann's parser lets invalid bytes through inside strings.
  if (const size_t valid = text::valid_utf8_prefix(body); valid < body.size())
    throw ApiError(400, fmt::format("the request body is not valid UTF-8 (at byte {})", valid));
  try {
    return nlohmann::json::parse(body);
  } catch (const nlohmann::json::exception& e) {
    // parse_error, and out_of_range for a number beyond a double (1e400).
    throw ApiError(400, fmt::format("malformed JSON body: {}", e.what()));
  }
}

JsonFields::JsonFields(const nlohmann::json& j, std::string prefix) : j_(j), prefix_(std::move(prefix)) {
  if (!j_.is_object())
    throw ApiError(400, fmt::format("{} must be a JSON object", prefix_.empty() ? "the request body" : prefix_));
}

bool JsonFields::has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

const nlohmann::json& JsonFields::raw(const std::string& key) const { return has(key) ? j_[key] : kNull; }

void JsonFields::bad(const std::string& key, const std::string& what) const {
  throw ApiError(400, fmt::format("'{}' {}", name(key), what), name(key));
}

std::optional<bool> JsonFields::boolean(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  if (!j_[key].is_boolean()) bad(key, "must be a boolean");
  return j_[key].get<bool>();
}

std::optional<int64_t> JsonFields::integer(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  const auto& v = j_[key];
  if (v.is_number_integer()) return v.get<int64_t>();
  // 16.0 is an integer too (JSON has one number type); the range check comes first, since a
  // double beyond int64's range does not convert.
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (d >= -9.2e18 && d <= 9.2e18 && d == std::floor(d)) return int64_t(d);
  }
  bad(key, "must be an integer");
}

std::optional<double> JsonFields::number(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  if (!j_[key].is_number()) bad(key, "must be a number");
  return j_[key].get<double>();
}

std::optional<std::string> JsonFields::string(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  if (!j_[key].is_string()) bad(key, "must be a string");
  return j_[key].get<std::string>();
}

std::optional<std::vector<int32_t>> JsonFields::ids(const std::string& key, int64_t limit) const {
  if (!has(key)) return std::nullopt;
  const auto& v = j_[key];
  if (!v.is_array()) bad(key, "must be a list of token ids");
  std::vector<int32_t> out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_number_integer()) bad(key, fmt::format("[{}] must be an integer token id", i));
    const int64_t id = v[i].get<int64_t>();
    if (id < 0 || id >= limit) bad(key, fmt::format("[{}] = {} is outside the vocabulary of {}", i, id, limit));
    out.push_back(int32_t(id));
  }
  return out;
}

std::vector<std::string> JsonFields::strings(const std::string& key) const {
  if (!has(key)) return {};
  const auto& v = j_[key];
  if (v.is_string()) return {v.get<std::string>()};
  if (!v.is_array()) bad(key, "must be a string or a list of strings");
  std::vector<std::string> out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_string()) bad(key, fmt::format("[{}] must be a string", i));
    out.push_back(v[i].get<std::string>());
  }
  return out;
}

}  // namespace ballast::serve
