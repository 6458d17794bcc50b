#pragma once
// Validators for numeric options that CLI11's own miss: CLI::Range lets NaN through (every
// comparison with NaN is false), and an unsigned option takes "-1" as 2^64 - 1.
#include <CLI/CLI.hpp>

#include <cmath>
#include <string>

namespace ballast::cli {

// A finite number in [lo, hi]: "nan", "inf" and out-of-range values are refused.
inline CLI::Validator finite_range(double lo, double hi) {
  return CLI::Validator(
      [lo, hi](std::string& in) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(in, v) || !std::isfinite(v) || v < lo || v > hi)
          return "Value " + in + " is not a finite number in [" + CLI::detail::to_string(lo) + ", " +
                 CLI::detail::to_string(hi) + "]";
        return {};
      },
      "FLOAT in [" + CLI::detail::to_string(lo) + " - " + CLI::detail::to_string(hi) + "]");
}

// A whole number written without a sign, for unsigned options (--seed).
inline CLI::Validator unsigned_integer() {
  return CLI::Validator(
      [](std::string& in) -> std::string {
        uint64_t v = 0;
        if (in.empty() || in[0] < '0' || in[0] > '9' || !CLI::detail::lexical_cast(in, v))
          return "Value " + in + " is not a whole number in [0, 2^64)";
        return {};
      },
      "UINT");
}

}  // namespace ballast::cli
