#include "ballast/core/dtype.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

using namespace ballast;

TEST(DType, Bf16RoundTripAndRounding) {
  for (float v : {0.0f, 1.0f, -2.5f, 3.140625f, std::ldexp(1.0f, -100), 65536.0f, -std::ldexp(1.5f, 100)})
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(v)), v) << v;
  // Rounds to nearest: 65504 (not a bf16 value) lies nearer 65536 than 65280.
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(65504.0f)), 65536.0f);
  // 1 + 2^-8 lies exactly between two bf16 values: ties go to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, F16RoundTrip) {
  for (float v : {0.0f, 1.0f, -2.5f, 0.333251953125f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f})
    EXPECT_EQ(f16_to_f32(f32_to_f16(v)), v) << v;
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
}

TEST(DType, Fp8E4M3) {
  EXPECT_EQ(fp8e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(0x7f)));
}

// f32_to_e4m3 against a search of all 254 finite codes: the nearest value, ties to the even code,
// saturating at +-448 (as CUDA's cvt.rn.satfinite.e4m3), NaN to 0x7f; over every code's value,
// every midpoint between neighbours and a step either side of it, and a million random floats.
TEST(DType, F32ToE4m3IsTheNearestCode) {
  const auto nearest = [](float f) -> uint8_t {
    if (std::isnan(f)) return 0x7f;
    const uint8_t sign = std::signbit(f) ? 0x80 : 0;
    const double a = std::min(std::fabs(double(f)), 448.0);
    int best = 0;
    for (int c = 1; c <= 0x7e; ++c) {
      const double d = std::fabs(double(fp8e4m3_to_f32(uint8_t(c))) - a),
                   bd = std::fabs(double(fp8e4m3_to_f32(uint8_t(best))) - a);
      if (d < bd || (d == bd && c % 2 == 0)) best = c;
    }
    return uint8_t(sign | best);
  };
  std::vector<float> xs = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e30f, -1e-30f, 464.0f, 463.99f, 480.0f};
  for (int c = 0; c <= 0x7e; ++c) {
    const float v = fp8e4m3_to_f32(uint8_t(c)), next = c < 0x7e ? fp8e4m3_to_f32(uint8_t(c + 1)) : 480.0f;
    const float mid = float((double(v) + double(next)) / 2);
    for (float x : {v, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) xs.insert(xs.end(), {x, -x});
  }
  uint32_t state = 7;
  for (int i = 0; i < 1000000; ++i) {
    state = state * 1664525u + 1013904223u;
    const uint32_t bits = (state & 0x80000000u) | (0x3A000000u + (state >> 8) % 0x0A000000u);  // ~2^-11 .. 2^9
    float f;
    std::memcpy(&f, &bits, 4);
    xs.push_back(f);
  }
  for (float x : xs) ASSERT_EQ(int(f32_to_e4m3(x)), int(nearest(x))) << x;
}

TEST(DType, Names) {
  DType t;
  EXPECT_TRUE(dtype_from_name("BF16", &t));
  EXPECT_EQ(t, DType::BF16);
  EXPECT_TRUE(dtype_from_name("I64", &t));
  EXPECT_EQ(t, DType::I64);
  EXPECT_FALSE(dtype_from_name("F64", &t));
  EXPECT_FALSE(dtype_from_name("I8", &t));
  EXPECT_EQ(dtype_name(DType::F16), "F16");
}
