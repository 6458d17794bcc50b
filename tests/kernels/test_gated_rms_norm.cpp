#include "ballast/kernels/cpu/gated_rms_norm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

using namespace ballast::kernels::cpu;

namespace {

TEST(GatedRmsNorm, MatchesFloat64ReferenceAndWorksInPlace) {
  for (int dv : {1, 7, 128}) {
    const int64_t rows = 9;
    const float eps = 1e-6f;
    std::mt19937 rng{uint32_t(dv)};
    std::normal_distribution<float> nd(0.f, 2.f);
    std::vector<float> o(size_t(rows) * dv), z(o.size()), w(static_cast<size_t>(dv)), out(o.size());
    for (auto* v : {&o, &z, &w})
      for (auto& e : *v) e = nd(rng);
    for (int i = 0; i < dv; ++i) o[size_t(i)] *= 1e-3f;  // one small-magnitude row: eps matters there
    gated_rms_norm(o.data(), z.data(), rows, dv, w.data(), eps, out.data());
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int i = 0; i < dv; ++i) ss += double(o[size_t(r * dv + i)]) * o[size_t(r * dv + i)];
      const double inv = 1.0 / std::sqrt(ss / dv + eps);
      for (int i = 0; i < dv; ++i) {
        const double zi = z[size_t(r * dv + i)];
        const double ref = double(w[size_t(i)]) * o[size_t(r * dv + i)] * inv * (zi / (1 + std::exp(-zi)));
        EXPECT_NEAR(out[size_t(r * dv + i)], ref, 1e-5 * (1 + std::abs(ref))) << "dv=" << dv << " r=" << r;
      }
    }
    std::vector<float> inplace = o;
    gated_rms_norm(inplace.data(), z.data(), rows, dv, w.data(), eps, inplace.data());
    EXPECT_EQ(inplace, out);
  }
}

}  // namespace
