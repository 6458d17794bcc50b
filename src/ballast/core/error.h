#pragma once
// Errors are values at the edges: code throws ballast::Error with a message that names the
// file, tensor, field or request at fault; the CLI and HTTP edges catch it.
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace ballast {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// check(cond, "...") throws Error with the formatted message when cond is false.
template <typename... Args>
void check(bool cond, fmt::format_string<Args...> f, Args&&... args) {
  if (!cond) throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace ballast
