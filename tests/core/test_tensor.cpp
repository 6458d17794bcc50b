#include "ballast/core/tensor.h"

#include <gtest/gtest.h>

#include <cmath>

#include "ballast/core/error.h"

using namespace ballast;

// The decoding table against the format's definition (bias 7, subnormals below exponent 1, NaN at
// S.1111.111 only).
TEST(DType, Fp8E4M3TableIsTheFormat) {
  for (int v = 0; v < 256; ++v) {
    const int sign = v >> 7, exp = (v >> 3) & 15, mant = v & 7;
    const float f = fp8e4m3_to_f32(uint8_t(v));
    if (exp == 15 && mant == 7) {
      EXPECT_TRUE(std::isnan(f)) << v;
      continue;
    }
    const double mag = exp == 0 ? std::ldexp(double(mant), -9) : std::ldexp(1.0 + mant / 8.0, exp - 7);
    EXPECT_EQ(double(f), sign ? -mag : mag) << v;
  }
}

// A block-scaled tensor keeps its scales through the views the loader takes (experts of a fused
// tensor, whole blocks of rows) and refuses views that would cut a block.
TEST(Tensor, BlockScaledViewsCarryTheirScales) {
  Tensor q = Tensor::zeros({3, 300, 200}, DType::F8_E4M3), s = Tensor::zeros({3, 3, 2});
  for (int64_t i = 0; i < s.numel(); ++i) s.f32()[i] = float(i);
  const Tensor t = Tensor::block_scaled(q, s);
  EXPECT_EQ(t.dtype(), DType::F8_E4M3_B128);
  EXPECT_EQ(t.storage_bytes(), size_t(3 * 300 * 200 + 18 * 4));
  const Tensor e1 = t[1];
  EXPECT_EQ(e1.shape(), (std::vector<int64_t>{300, 200}));
  EXPECT_EQ(e1.scales().shape(), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(e1.scales().f32()[0], 6.0f);
  const Tensor low = e1.rows(256, 300);  // the last, partial, block of rows
  EXPECT_EQ(low.scales().shape(), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(low.scales().f32()[0], 10.0f);
  EXPECT_EQ(e1.rows(128, 256).scales().f32()[1], 9.0f);
  EXPECT_THROW(e1.rows(0, 100), Error);
  EXPECT_THROW(e1.rows(64, 128), Error);
  EXPECT_EQ(e1.elements().dtype(), DType::F8_E4M3);
  EXPECT_EQ(t.reshape({3, 1, 300, 200}).scales().shape(), (std::vector<int64_t>{3, 1, 3, 2}));  // leading dims regroup
  EXPECT_THROW(t.reshape({1, 900, 200}), Error);  // rows would cross experts
  EXPECT_THROW(t.reshape({3, 200, 300}), Error);
  EXPECT_THROW(Tensor::block_scaled(q, Tensor::zeros({3, 2, 2})), Error);
  EXPECT_THROW(Tensor::zeros({2, 2}).scales(), Error);
}

TEST(Tensor, ByteViewsShareStorageWithinRange) {
  Tensor b = Tensor::zeros({64}, DType::U8);
  const Tensor f = b.view_bytes(16, {4}, DType::F32);
  f.f32()[1] = 2.0f;
  EXPECT_EQ(f.raw(), static_cast<char*>(b.raw()) + 16);
  EXPECT_EQ(b.data<uint8_t>()[16 + 7], 0x40);  // 2.0f = 0x40000000, little-endian
  EXPECT_THROW(b.view_bytes(56, {4}, DType::F32), Error);
}
