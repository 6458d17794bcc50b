#pragma once
// Server-sent events as OpenAI and SGLang stream them: one `data:` line per JSON event, a blank
// line after each, `data: [DONE]` last. A comment line keeps an idle stream alive (and finds out
// that a client has gone: writing to it fails).
#include <string>
#include <string_view>

namespace ballast::serve::sse {

inline std::string event(std::string_view data) {
  std::string e = "data: ";
  e += data;
  e += "\n\n";
  return e;
}
inline constexpr std::string_view kDone = "data: [DONE]\n\n";
inline constexpr std::string_view kKeepAlive = ": keep-alive\n\n";

}  // namespace ballast::serve::sse
