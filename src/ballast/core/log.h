#pragma once
// Minimal leveled logging to stderr. The level is a value the caller owns (no global logger).
#include <fmt/format.h>

#include <cstdio>

namespace ballast {

enum class LogLevel { Quiet = 0, Info = 1, Debug = 2 };

struct Logger {
  LogLevel level = LogLevel::Info;

  template <typename... Args>
  void info(fmt::format_string<Args...> f, Args&&... args) const {
    if (level >= LogLevel::Info) fmt::print(stderr, "[ballast] {}\n", fmt::format(f, std::forward<Args>(args)...));
  }
  template <typename... Args>
  void debug(fmt::format_string<Args...> f, Args&&... args) const {
    if (level >= LogLevel::Debug) fmt::print(stderr, "[ballast:debug] {}\n", fmt::format(f, std::forward<Args>(args)...));
  }
};

}  // namespace ballast
