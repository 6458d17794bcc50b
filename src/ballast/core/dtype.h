#pragma once
// Storage dtypes. Arithmetic is always fp32; these are the formats weights and caches live in.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

namespace ballast {

// I32/I64 hold ids (reference fixtures, dumps); they are never weights. U8 is raw bytes (a slot's
// packed expert weights and scales, moved as one blob). F8_E4M3_B128 is Qwen's fine-grained FP8:
// e4m3 elements whose tensor carries F32 scales, one per kScaleBlock x kScaleBlock block of its
// last two dims (Tensor::block_scaled); a checkpoint stores those as F8_E4M3 elements and a
// `weight_scale_inv` tensor beside them, so it is no safetensors dtype.
enum class DType : uint8_t { F32, BF16, F16, F8_E4M3, I32, I64, U8, F8_E4M3_B128 };

// The side of a scale block of F8_E4M3_B128 (Qwen's weight_block_size [128, 128]).
inline constexpr int64_t kScaleBlock = 128;
// Scale blocks along a dimension of n elements (the last one partial when n % 128 != 0).
inline constexpr int64_t scale_blocks(int64_t n) { return (n + kScaleBlock - 1) / kScaleBlock; }

size_t dtype_size(DType t);                    // bytes per element (F8_E4M3_B128: 1, scales apart)
std::string_view dtype_name(DType t);          // safetensors spelling: "F32", "BF16", ...
bool dtype_from_name(std::string_view s, DType* out);  // false if unsupported (U8, F8_E4M3_B128 too)

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

namespace detail {
// E4M3 (OCP float8_e4m3fn: bias 7, no infinities, S.1111.111 NaN) as float, computed exactly.
constexpr float e4m3_value(uint32_t v) {
  const uint32_t exp = (v >> 3) & 0xf, mant = v & 7;
  float r = 0;
  if (exp == 0xf && mant == 7) {
    r = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    r = float(mant) / 512.0f;  // subnormal: mant * 2^-9
  } else {
    r = float(8 + mant) / 8.0f;  // 1.mmm, times 2^(exp - 7) by exact doublings or halvings
    for (uint32_t e = 7; e < exp; ++e) r *= 2.0f;
    for (uint32_t e = exp; e < 7; ++e) r /= 2.0f;
  }
  return v & 0x80 ? -r : r;
}
struct E4m3Table {
  float value[256];
  constexpr E4m3Table() : value() {
    for (uint32_t v = 0; v < 256; ++v) value[v] = e4m3_value(v);
  }
};
// A table, so that decoding an FP8 weight inside a dot product is one load.
inline constexpr E4m3Table kE4m3;
}  // namespace detail

inline float fp8e4m3_to_f32(uint8_t v) { return detail::kE4m3.value[v]; }
// The largest finite E4M3 value: block scales are amax / it.
inline constexpr float kE4m3Max = 448.0f;

// The E4M3 code nearest to f, ties to even, saturating at +-448 (infinities too; NaN: 0x7f): what
// CUDA's cvt.rn.satfinite.e4m3 gives, so that both backends make the same random FP8 weights. Bit
// arithmetic, no libm: it runs once per weight when a checkpoint is quantized at load. (Checked
// against the libm formulation it replaced for every float: equal but at +-inf, which that one
// turned into +-1.0 through an integer overflow.)
inline uint8_t f32_to_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return 0x7f;                   // NaN
  if (u >= 0x43E00000u) return uint8_t(sign | 0x7e);  // >= 448 (and infinity): 448
  if (u < 0x3C800000u) {                              // below 2^-6: subnormal steps of 2^-9
    float a;
    std::memcpy(&a, &u, 4);
    return uint8_t(sign | int(std::nearbyint(a * 512.0f)));  // 0..8 (8: 2^-6, the first normal)
  }
  u += 0x7FFFFu + ((u >> 20) & 1u);  // the mantissa rounded to 3 bits, ties to even (may carry into e)
  const uint32_t code = (((u >> 23) - 120u) << 3) | ((u >> 20) & 7u);  // exponent bias 127 -> 7
  return uint8_t(sign | (code > 0x7eu ? 0x7eu : code));
}

// The index of the first NaN or infinity among n elements of src in dtype t (F32, BF16, F16 or
// F8_E4M3), or -1 when every one is finite or t holds no floats.
int64_t first_non_finite(const void* src, DType t, size_t n);

// Converts n elements of src (in dtype t) to fp32. Throws for U8 (no numbers) and F8_E4M3_B128
// (its elements mean nothing without their block scales: see kernels' weight readers).
void to_f32(const void* src, DType t, float* dst, size_t n);

}  // namespace ballast
