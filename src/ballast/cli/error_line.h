#pragma once
// How the command line reports an error: one line, "error: " and the message, with control bytes
// (a newline or an escape sequence from a file name or a field's value) shown as \xNN so that a
// message never spans lines nor drives the terminal.
#include <cstdio>
#include <string>
#include <string_view>

namespace ballast::cli {

inline std::string error_line(std::string_view what) {
  std::string out = "error: ";
  for (unsigned char c : what) {
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + "\n";
}

// Exit codes (README, "Reliability"): 0 done, 1 an error, 2 a bad command line, 128 + N ended by
// signal N (SIGINT 130, SIGTERM 143) after finishing cleanly.
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

}  // namespace ballast::cli
