#pragma once
// Wall time in seconds on the monotonic clock, for the figures ballast reports.
#include <chrono>

namespace ballast {

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds since a start taken with now_seconds().
inline double seconds_since(double start) { return now_seconds() - start; }

}  // namespace ballast
