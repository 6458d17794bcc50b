// Checked size arithmetic and the non-finite scan (issue 16: sizes from input never wrap, NaN
// weights never pass).
#include "ballast/core/checked.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ballast/core/dtype.h"
#include "support/expect_error.h"

namespace ballast {
namespace {

using test::expect_error;

TEST(Checked, OverflowIsAnErrorNamingWhat) {
  EXPECT_EQ(checked_mul(1 << 20, 1 << 20, "x"), int64_t(1) << 40);
  expect_error([] { checked_mul(int64_t(1) << 40, int64_t(1) << 40, "shape of t"); }, {"shape of t", "overflows"});
  expect_error([] { checked_add(INT64_MAX, 1, "rows"); }, {"rows", "overflows"});
  // [2^62 + 1, 1, 1] and [2^40]^3: the shapes of the load files.
  const std::vector<int64_t> a{(int64_t(1) << 62) + 1, 1, 1}, b(3, int64_t(1) << 40);
  expect_error([&] { checked_numel(a, int64_t(1) << 28, "load"); }, {"load", "outside"});
  expect_error([&] { checked_numel(b, int64_t(1) << 28, "load"); }, {"load", "1099511627776 is outside"});
  const std::vector<int64_t> ok{3, 4, 5}, negative{3, -1};
  EXPECT_EQ(checked_numel(ok, 60, "x"), 60);
  expect_error([&] { checked_numel(negative, 60, "x"); }, {"-1"});
  EXPECT_EQ(checked_int(7, "x"), 7);
  expect_error([] { checked_int(int64_t(1) << 31, "layers"); }, {"layers", "32-bit"});
  expect_error([] { checked_finite(std::nan(""), "--skew"); }, {"--skew", "not a finite number"});
  expect_error([] { checked_finite(-HUGE_VAL, "x"); }, {"not a finite number"});
}

TEST(Dtype, FirstNonFiniteOfEachFloatFormat) {
  std::vector<float> f(1000, 1.5f);
  EXPECT_EQ(first_non_finite(f.data(), DType::F32, f.size()), -1);
  f[700] = std::numeric_limits<float>::infinity();
  f[900] = std::nanf("");
  EXPECT_EQ(first_non_finite(f.data(), DType::F32, f.size()), 700);
  std::vector<uint16_t> h(600, f32_to_bf16(2.0f));
  EXPECT_EQ(first_non_finite(h.data(), DType::BF16, h.size()), -1);
  h[599] = f32_to_bf16(std::nanf(""));
  EXPECT_EQ(first_non_finite(h.data(), DType::BF16, h.size()), 599);
  std::vector<uint16_t> g(10, f32_to_f16(-3.0f));
  g[3] = 0x7c00;  // +inf
  EXPECT_EQ(first_non_finite(g.data(), DType::F16, g.size()), 3);
  std::vector<uint8_t> e(10, 0x38);  // 1.0
  EXPECT_EQ(first_non_finite(e.data(), DType::F8_E4M3, e.size()), -1);
  e[4] = 0xff;  // e4m3's NaN
  EXPECT_EQ(first_non_finite(e.data(), DType::F8_E4M3, e.size()), 4);
  std::vector<int32_t> ids(4, -1);  // all bits set, but ids hold no floats
  EXPECT_EQ(first_non_finite(ids.data(), DType::I32, ids.size()), -1);
}

}  // namespace
}  // namespace ballast
