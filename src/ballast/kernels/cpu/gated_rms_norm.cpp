#include "ballast/kernels/cpu/gated_rms_norm.h"

#include <cmath>

#include "ballast/core/error.h"

namespace ballast::kernels::cpu {

void gated_rms_norm(const float* o, const float* z, int64_t rows, int dv, const float* w, float eps, float* out) {
  check(rows >= 0 && dv > 0, "gated_rms_norm: bad shape rows={} dv={}", rows, dv);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = o + r * dv;
    const float* zr = z + r * dv;
    float* y = out + r * dv;
    float ss = 0.f;
    for (int i = 0; i < dv; ++i) ss += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(ss / float(dv) + eps);
    for (int i = 0; i < dv; ++i) {
      const float zi = zr[i];
      const float silu = zi / (1.0f + std::exp(-zi));
      y[i] = w[i] * (x[i] * inv) * silu;
    }
  }
}

}  // namespace ballast::kernels::cpu
