#pragma once
// splitmix64's finaliser: the hash behind every deterministic "random" choice (replica picks,
// sampling uniforms), usable on the host and in device code alike.
#include <cstdint>

namespace ballast {

constexpr uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace ballast
