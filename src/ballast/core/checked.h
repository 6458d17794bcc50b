#pragma once
// Checked arithmetic for sizes that come from input (a shape in a file, a count on the command
// line): an overflow is an Error naming what was being computed, never a wrapped size that later
// allocates too little or loops for ever.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>

#include "ballast/core/error.h"

namespace ballast {

// a * b, or Error("<what>: a x b overflows").
inline int64_t checked_mul(int64_t a, int64_t b, std::string_view what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) fail("{}: {} x {} overflows", what, a, b);
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, std::string_view what) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) fail("{}: {} + {} overflows", what, a, b);
  return r;
}

// The product of `dims`, each in [0, limit] and the product too; Error naming `what` otherwise.
template <typename Range>
int64_t checked_numel(const Range& dims, int64_t limit, std::string_view what) {
  int64_t n = 1;
  for (auto d : dims) {
    if (d < 0 || uint64_t(d) > uint64_t(limit)) fail("{}: dimension {} is outside [0, {}]", what, d, limit);
    n = checked_mul(n, int64_t(d), what);
    if (n > limit) fail("{}: {} elements, more than the limit of {}", what, n, limit);
  }
  return n;
}

// v as an int, or Error naming `what` when it does not fit.
inline int checked_int(int64_t v, std::string_view what) {
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max())
    fail("{}: {} does not fit a 32-bit integer", what, v);
  return int(v);
}

// A double read from input that must be a number: NaN and infinities are refused.
inline double checked_finite(double v, std::string_view what) {
  if (!std::isfinite(v)) fail("{}: {} is not a finite number", what, v);
  return v;
}

}  // namespace ballast
