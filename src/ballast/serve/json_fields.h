#pragma once
// Typed reads of a request body's fields: a field of the wrong type is a 400 naming it. Absent
// and null fields read as "not given".
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "ballast/serve/api_error.h"

namespace ballast::serve {

// A request body as JSON: 400 when it is not valid UTF-8 or not JSON (numbers beyond a double
// included), naming the byte or the parser's reason.
nlohmann::json parse_request_body(std::string_view body);

class JsonFields {
 public:
  // `prefix` names the object in errors ("sampling_params." for SGLang's).
  explicit JsonFields(const nlohmann::json& j, std::string prefix = {});

  bool has(const std::string& key) const;
  const nlohmann::json& raw(const std::string& key) const;  // null when absent
  std::optional<bool> boolean(const std::string& key) const;
  std::optional<int64_t> integer(const std::string& key) const;
  std::optional<double> number(const std::string& key) const;
  std::optional<std::string> string(const std::string& key) const;
  // A list of integers (token ids), each in [0, limit).
  std::optional<std::vector<int32_t>> ids(const std::string& key, int64_t limit) const;
  // A string or a list of strings (OpenAI's `stop`).
  std::vector<std::string> strings(const std::string& key) const;
  [[noreturn]] void bad(const std::string& key, const std::string& what) const;

 private:
  std::string name(const std::string& key) const { return prefix_ + key; }

  const nlohmann::json& j_;
  std::string prefix_;
};

}  // namespace ballast::serve
