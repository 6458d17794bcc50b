#include "ballast/core/dtype.h"

#include <gtest/gtest.h>

#include <cmath>

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
