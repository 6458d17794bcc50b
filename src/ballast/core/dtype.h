#pragma once
// Storage dtypes. Arithmetic is always fp32; these are the formats weights and caches live in.
#include <cstdint>
#include <cstring>
#include <string_view>

namespace ballast {

// I32/I64 hold ids (reference fixtures, dumps); they are never weights.
enum class DType : uint8_t { F32, BF16, F16, F8_E4M3, I32, I64 };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);          // safetensors spelling: "F32", "BF16", ...
bool dtype_from_name(std::string_view s, DType* out);  // false if unsupported

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float fp8e4m3_to_f32(uint8_t v);

// Converts n elements of src (in dtype t) to fp32.
void to_f32(const void* src, DType t, float* dst, size_t n);

}  // namespace ballast
