#include "ballast/core/dtype.h"

#include <algorithm>
#include <cmath>

#include "ballast/core/error.h"

namespace ballast {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::F8_E4M3: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
    case DType::F8_E4M3_B128: return 1;
  }
  return 0;
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
    case DType::F8_E4M3_B128: return "F8_E4M3_B128";
  }
  return "?";
}

bool dtype_from_name(std::string_view s, DType* out) {
  if (s == "F32") *out = DType::F32;
  else if (s == "BF16") *out = DType::BF16;
  else if (s == "F16") *out = DType::F16;
  else if (s == "F8_E4M3") *out = DType::F8_E4M3;
  else if (s == "I32") *out = DType::I32;
  else if (s == "I64") *out = DType::I64;
  else return false;
  return true;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(float(mant), -24);
  else if (exp == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(float(mant | 0x400), int(exp) - 25);
  return sign ? -v : v;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  int32_t exp = int32_t((u >> 23) & 0xff) - 127 + 15;
  uint32_t mant = u & 0x7fffff;
  if (((u >> 23) & 0xff) == 0xff) return uint16_t(sign | 0x7c00 | (mant ? 0x200 : 0));
  if (exp >= 31) return uint16_t(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    mant |= 0x800000;
    uint32_t shift = uint32_t(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return uint16_t(sign | half);
  }
  uint32_t h = sign | (uint32_t(exp) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
  return uint16_t(h);
}

namespace {
// The first element whose bits under `mask` are all set (an all-ones exponent: NaN or infinity;
// for e4m3 the one NaN pattern). Blocks are OR-reduced first, so a finite tensor is one fast pass.
template <typename U>
int64_t first_with_bits(const void* src, size_t n, U mask) {
  auto* s = static_cast<const U*>(src);
  constexpr size_t kBlock = 256;
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t e = std::min(n, b + kBlock);
    bool any = false;
    for (size_t i = b; i < e; ++i) any |= (s[i] & mask) == mask;
    if (!any) continue;
    for (size_t i = b; i < e; ++i)
      if ((s[i] & mask) == mask) return int64_t(i);
  }
  return -1;
}
}  // namespace

int64_t first_non_finite(const void* src, DType t, size_t n) {
  switch (t) {
    case DType::F32: return first_with_bits<uint32_t>(src, n, 0x7f800000u);
    case DType::BF16: return first_with_bits<uint16_t>(src, n, 0x7f80u);
    case DType::F16: return first_with_bits<uint16_t>(src, n, 0x7c00u);
    case DType::F8_E4M3: return first_with_bits<uint8_t>(src, n, 0x7fu);
    default: return -1;
  }
}

void to_f32(const void* src, DType t, float* dst, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F8_E4M3: {
      auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = fp8e4m3_to_f32(s[i]);
      return;
    }
    case DType::I32: {
      auto* s = static_cast<const int32_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    case DType::I64: {
      auto* s = static_cast<const int64_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    case DType::U8: fail("to_f32: U8 holds raw bytes, not numbers");
    case DType::F8_E4M3_B128:
      fail("to_f32: F8_E4M3_B128 elements need their block scales (read the tensor, not its elements)");
  }
}

}  // namespace ballast
