#pragma once
// Server-sent events as OpenAI and SGLang stream them: one `data:` line per JSON event, a blank
// line after each, `data: [DONE]` last. A comment line keeps an idle stream alive (and finds out
// that a client has gone: writing to it fails).
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace ballast::serve::sse {

// Invalid UTF-8 (never in the text deltas, which hold whole characters) would show as U+FFFD.
inline std::string event(const nlohmann::json& data) {
  return "data: " + data.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n\n";
}
inline constexpr std::string_view kDone = "data: [DONE]\n\n";
inline constexpr std::string_view kKeepAlive = ": keep-alive\n\n";

}  // namespace ballast::serve::sse
