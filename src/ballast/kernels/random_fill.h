#pragma once
// The value of element i of a randomly filled tensor (Ops::fill_uniform): uniform in
// [-scale, scale), from 24 bits of a hash of (seed, i), so that every backend makes the same
// weights and a tensor's elements do not depend on how the work is split.
#include <cstdint>

#include "ballast/core/hash.h"

namespace ballast::kernels {

constexpr float uniform_weight(uint64_t seed, uint64_t i, float scale) {
  const uint64_t h = mix64(mix64(seed) ^ i);
  const float u = float(h >> 40) * 0x1.0p-24f;  // [0, 1), exact in fp32
  return scale * (2.0f * u - 1.0f);
}

}  // namespace ballast::kernels
