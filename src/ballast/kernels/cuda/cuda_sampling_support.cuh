#pragma once
// The scalar math of the CUDA sample and verify_drafts ops (cuda_sampling.cu), host and device
// alike so that it can be checked on the host against kernels::distribution / kernels::sample.
// Internal to ballast_kernels_cuda.
//
// A row's processed distribution is described without materialising it:
//   raw(i)   = float(double(e_i) / sum),  e_i = float(exp((logit_i - max) / temperature)),
//              sum = sum of e_i in double (the CPU's softmax, value for value);
//   kept(i)  = the top-k / top-p set, as a threshold on the float bits of raw(i) (`key`), with the
//              ties at the threshold kept up to an id (the CPU's order: probability descending,
//              ties to the lower id);
//   final(i) = kept(i) ? float(double(raw(i)) / kept_mass) : 0 (untruncated rows: raw(i)).
// The threshold is found by a radix select over the keys (3 levels of 10 bits: a probability in
// [0, 1] has float bits below 2^30), counting and summing the mass of each bin. Masses are summed
// in 2^-62 fixed point: integer sums, exact for every p >= 2^-39 (so order-independent and
// deterministic), where the CPU sums in double in sorted order; the two agree but for a top-p that
// falls within ~1e-16 of a partial sum.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace ballast::kernels::cuda::sampling {

constexpr int kKeyBits = 30;  // float bits of a probability in [0, 1] are < 2^30
constexpr int kDigitBits = 10;
constexpr int kBins = 1 << kDigitBits;
constexpr uint32_t kKeyOne = 0x3F800000u;  // the bits of 1.0f
constexpr double kFixedOne = 0x1p62;       // fixed-point mass of probability 1
constexpr int64_t kMaxTokens = int64_t(1) << 30;  // V: ids, counts and a tile past the end fit int

__host__ __device__ inline uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

__host__ __device__ inline uint64_t double_bits(double d) {
#ifdef __CUDA_ARCH__
  return uint64_t(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
#endif
}

// A row's sampling parameters, made valid: they are device data, so the host cannot check them.
// temperature <= 0 (or NaN): greedy. top_p: (0, 1], a value <= 0 becomes the smallest positive
// float (the most likely token alone), a value > 1 (or NaN) becomes 1. top_k < 0 becomes 0 (no
// limit).
struct RowSampling {
  bool greedy;
  float temperature, top_p;
  int32_t top_k;
};

__host__ __device__ inline RowSampling clamp_row(float temperature, float top_p, int32_t top_k) {
  RowSampling s;
  s.greedy = !(temperature > 0.0f);
  s.temperature = temperature;
  s.top_p = top_p <= 0.0f ? 0x1p-149f : (top_p <= 1.0f ? top_p : 1.0f);  // NaN: not <= 1, so 1
  s.top_k = top_k < 0 ? 0 : top_k;
  return s;
}

// Rows whose distribution is the softmax itself (the CPU returns before truncating: no
// renormalisation).
__host__ __device__ inline bool untruncated(const RowSampling& s) { return s.top_k == 0 && s.top_p >= 1.0f; }

// float(double(num) / den), out of line: the rare case of div_to_float.
__host__ __device__ __noinline__ inline float div_exact(float num, double den) { return float(double(num) / den); }

// The float(double(num) / den) of the CPU, num >= 0 a float, through a multiplication by
// inv = 1.0 / den: y = num * inv is within 2.5 double ulps of the exact quotient and of the CPU's
// correctly rounded one, so both round to the same float unless y lies within a few double ulps of
// a rounding boundary of float (a midpoint between two floats), where the division itself decides.
__host__ __device__ inline float div_to_float(float num, double den, double inv) {
  const double y = double(num) * inv;
  if (y >= 0x1p-126) {
    // Normal floats: rounding to float drops the low 29 of the 52 fraction bits; a midpoint is
    // 1 followed by 28 zeros there.
    const uint32_t low = uint32_t(double_bits(y)) & 0x1FFFFFFFu;
    if (low - (0x10000000u - 16u) > 32u) return float(y);
  } else if (y > 0.0) {
    // Subnormal floats: steps of 2^-149, the midpoints at half-integers of y * 2^149 (exact).
    const double z = y * 0x1p149;
    if (fabs(z - floor(z) - 0.5) > 0x1p-20) return float(y);
  }
  return div_exact(num, den);
}

// The radix key of a probability (its float bits; 0 for 0 and for anything that is not a
// probability).
__host__ __device__ inline uint32_t key_of(float p) {
  if (!(p > 0.0f)) return 0u;
  const uint32_t k = float_bits(p);
  return k < kKeyOne ? k : kKeyOne;
}

// p in 2^-62 fixed point (truncated; exact for p >= 2^-39).
__host__ __device__ inline uint64_t fixed_mass(float p) {
  if (!(p > 0.0f)) return 0;
  return uint64_t(double(p < 1.0f ? p : 1.0f) * kFixedOne);
}

// The fixed-point mass that reaches top_p: mass >= top_p  <=>  fixed mass >= this (for exact
// masses).
__host__ __device__ inline uint64_t nucleus_threshold(float top_p) {
  if (top_p >= 1.0f) return uint64_t(1) << 62;
  return uint64_t(ceil(double(top_p) * kFixedOne));
}

// The truncation: a prefix of the keys (key >> shift) above which every token is kept, at which
// tokens are kept up to id tie_last, below which none is. (An aggregate: it lives in shared
// memory.)
struct Cut {
  int shift;
  uint32_t prefix;
  int tie_last;
  uint64_t kept_fixed;  // fixed-point mass of the kept tokens

  __host__ __device__ bool keeps(uint32_t key, int id) const {
    const uint32_t g = key >> shift;
    return g > prefix || (g == prefix && id <= tie_last);
  }
};

// One level of the radix select: the bin (in descending digit order, within the group of tokens
// whose higher bits are the group's prefix) where the count reaches n_k or the mass reaches thr.
struct Boundary {
  int digit;          // -1: not reached within the group (cannot happen with exact sums)
  int c_excl;         // tokens before the bin: above the group, and in the group's higher bins
  uint64_t m_excl;    // their mass
  int count;          // tokens of the bin
  uint64_t mass;      // their mass
  uint64_t m_group;   // mass above the group plus the group's whole mass (digit -1 only)
};

__host__ __device__ inline bool reached(int c, uint64_t m, int n_k, uint64_t thr) {
  return c >= n_k || m >= thr;
}

// What a level's boundary decides. Returns true when the cut is known (`cut` set, except that
// `tie_rank` > 0 asks for tie_last: the id of the tie_rank-th token, in id order, whose key is
// cut.prefix at shift 0); false when the next level must look inside the bin (c_above, m_above
// and group updated).
struct LevelState {
  int c_above = 0;
  uint64_t m_above = 0;
  uint32_t group = 0;  // prefix of the current group: key >> (shift + kDigitBits)
};

__host__ __device__ inline bool decide(const Boundary& b, int shift, int n_k, uint64_t thr, LevelState& st,
                                       Cut& cut, int& tie_rank) {
  tie_rank = 0;
  if (b.digit < 0) {  // keep the whole group (defensive: sums are exact, so never taken)
    cut.shift = shift + kDigitBits;
    cut.prefix = st.group;
    cut.tie_last = INT_MAX;
    cut.kept_fixed = b.m_group;
    return true;
  }
  const uint32_t prefix = (st.group << kDigitBits) | uint32_t(b.digit);
  const int c_incl = b.c_excl + b.count;
  const uint64_t m_incl = b.m_excl + b.mass;
  // The bin ends the kept set: one token, or the count reaches k exactly at its end while the
  // mass stays below top_p.
  if (b.count == 1 || (m_incl < thr && c_incl == n_k)) {
    cut.shift = shift;
    cut.prefix = prefix;
    cut.tie_last = INT_MAX;
    cut.kept_fixed = m_incl;
    return true;
  }
  if (shift == 0) {
    // Every token of the bin has the same probability t: keep j of them, in id order.
    const uint64_t t = b.mass / uint64_t(b.count);
    int j = n_k - b.c_excl;
    if (j > b.count) j = b.count;
    if (t > 0) {  // b.m_excl < thr: the bin was not reached before
      const uint64_t jp = (thr - b.m_excl + t - 1) / t;
      if (jp < uint64_t(j)) j = int(jp);
    }
    if (j < 1) j = 1;  // defensive
    cut.shift = 0;
    cut.prefix = prefix;
    cut.tie_last = INT_MAX;
    cut.kept_fixed = b.m_excl + uint64_t(j) * t;
    if (j < b.count) tie_rank = j;
    return true;
  }
  st.c_above = b.c_excl;
  st.m_above = b.m_excl;
  st.group = prefix;
  return false;
}

}  // namespace ballast::kernels::cuda::sampling
