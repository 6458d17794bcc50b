#pragma once
// A request the server will not serve, as the endpoints throw it and the HTTP layer answers it:
// a status and OpenAI's error object {"error": {"message", "type", "param", "code"}}.
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace ballast::serve {

struct ApiError : std::runtime_error {
  ApiError(int status, const std::string& message, std::string param = {})
      : std::runtime_error(message), status(status), param(std::move(param)) {}
  int status;
  std::string param;  // the request field at fault, if one is
};

// OpenAI's error type for a status (invalid_request_error, not_found_error, ...).
inline const char* error_type(int status) {
  switch (status) {
    case 404: return "not_found_error";
    case 408: return "timeout_error";
    case 503: return "overloaded_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

inline nlohmann::json error_body(int status, const std::string& message, const std::string& param = {}) {
  return {{"error",
           {{"message", message},
            {"type", error_type(status)},
            {"param", param.empty() ? nlohmann::json(nullptr) : nlohmann::json(param)},
            {"code", status}}}};
}

}  // namespace ballast::serve
