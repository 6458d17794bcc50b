#pragma once
// Gated RMSNorm applied to the Gated DeltaNet output, per value head (docs/model.md, Norms).
#include <cstdint>

namespace ballast::kernels::cpu {

// For each of `rows` rows of dv floats (contiguous):
//   out = w * x * rsqrt(mean(x^2) + eps) * silu(z)     (plain w, not 1 + w)
// o, z, out: [rows, dv]; w: [dv]. out may alias o (or z).
void gated_rms_norm(const float* o, const float* z, int64_t rows, int dv, const float* w, float eps, float* out);

}  // namespace ballast::kernels::cpu
