// AVX-512 row products (avx512_matmul.h). Every function that uses AVX-512 carries the target
// attribute itself, so this file builds for baseline x86-64 and matmul.cpp calls in only after
// available() said yes.
//
// The product is a tile of dot products, not BLAS's packed outer product: MT x rows (fp32, split
// even/odd) against NN weight rows read in place, MT * NN accumulators of 16 lanes, summed across
// lanes once at the end. A weight row is widened in registers (bf16: a shift and a mask of each
// 32-bit lane; FP8: the e4m3 bits placed into an fp32's), so there is no packing pass and a tile
// of few x rows (decode, an expert's handful of tokens) costs what its multiply-adds cost.
#include "ballast/kernels/cpu/avx512_matmul.h"

#include <algorithm>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's intrinsics seed results with self-initialised "undefined" vectors, which its
// uninitialised-use warnings report at every inlined call (false positives).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define BALLAST_X86 1
#endif

namespace ballast::kernels::cpu::avx512 {

#ifdef BALLAST_X86

#define BALLAST_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

bool available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  return ok;
}

void split_rows(const float* x, int64_t T, int64_t K, float* xs) {
  const int64_t Kp = split_width(K);
  for (int64_t t = 0; t < T; ++t) {
    const float* src = x + t * K;
    float* dst = xs + t * Kp;
    for (int64_t k0 = 0; k0 < Kp; k0 += 32)
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t e = k0 + 2 * j, o = e + 1;
        dst[k0 + j] = e < K ? src[e] : 0.0f;
        dst[k0 + 16 + j] = o < K ? src[o] : 0.0f;
      }
  }
}

namespace {

// 32 weights of one row widened: the even-indexed ones into `even`, the odd ones into `odd`.
// `mask` selects the columns that exist (the row's last, partial block reads no further).
struct Bf16Row {
  const uint16_t* w;
  BALLAST_AVX512 __attribute__((always_inline)) inline void load(int64_t k, __mmask32 mask, bool full, __m512& even, __m512& odd) const {
    const __m512i v = full ? _mm512_loadu_si512(w + k) : _mm512_maskz_loadu_epi16(mask, w + k);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
  }
};

// e4m3 magnitude bits shifted into an fp32's exponent and mantissa read as 2^-120 times the
// value (subnormals included: they land on fp32 subnormals); times 2^120 exactly, then times the
// block scale: one rounding, as e4m3(q) * s. (0x7F / 0xFF, e4m3's NaN, come out as +-480.)
struct Fp8Row {
  const uint8_t* w;
  const float* s;  // this row's block scales, one per 128 columns
  BALLAST_AVX512 __attribute__((always_inline)) inline void load(int64_t k, __mmask32 mask, bool full, __m512& even, __m512& odd) const {
    const __m256i b = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k))
                           : _mm256_maskz_loadu_epi8(mask, w + k);
    const __m512i v = _mm512_cvtepu8_epi16(b);  // lane j: element 2j low, 2j + 1 high
    const __m512i e = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x7F)), 20),
                                      _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x80)), 24));
    const __m512i o = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x7F0000)), 4),
                                      _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x800000)), 8));
    const __m512 two120 = _mm512_set1_ps(0x1p120f), sc = _mm512_set1_ps(s[k / 128]);
    even = _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(e), two120), sc);
    odd = _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(o), two120), sc);
  }
};

// One 32-column step of a tile: MT x rows (stride Kp) against NN weight rows, into acc.
template <int MT, int NN, typename Row>
BALLAST_AVX512 __attribute__((always_inline)) inline void step(const float* xs, int64_t Kp, const Row* rows, int64_t k,
                                                               __mmask32 mask, bool full, __m512 (&acc)[MT][NN]) {
  __m512 xe[MT], xo[MT];
  for (int t = 0; t < MT; ++t) {
    xe[t] = _mm512_loadu_ps(xs + t * Kp + k);
    xo[t] = _mm512_loadu_ps(xs + t * Kp + k + 16);
  }
  for (int r = 0; r < NN; ++r) {
    __m512 we, wo;
    rows[r].load(k, mask, full, we, wo);
    for (int t = 0; t < MT; ++t) {
      acc[t][r] = _mm512_fmadd_ps(xe[t], we, acc[t][r]);
      acc[t][r] = _mm512_fmadd_ps(xo[t], wo, acc[t][r]);
    }
  }
}

// y[t * ldy + r] = xs[t] . row r, for MT x rows (stride Kp) and NN weight rows.
template <int MT, int NN, typename Row>
BALLAST_AVX512 void tile(const float* xs, int64_t Kp, int64_t K, const Row* rows, float* y, int64_t ldy) {
  __m512 acc[MT][NN];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NN; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step<MT, NN>(xs, Kp, rows, k, ~__mmask32(0), true, acc);
  if (k < K) step<MT, NN>(xs, Kp, rows, k, __mmask32((1u << (K - k)) - 1), false, acc);
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NN; ++r) y[t * ldy + r] = _mm512_reduce_add_ps(acc[t][r]);
}

// The widest tile of MT x rows that keeps accumulators, x and the widened weights within the 32
// vector registers: 4 x 5 (20 + 8 + 2), 3 x 6, 2 x 8, 1 x 8.
constexpr int widest(int mt) { return mt == 4 ? 5 : mt == 3 ? 6 : 8; }

template <typename Row, int MT, int NN>
BALLAST_AVX512 void tile_rows(const float* xs, int64_t Kp, int64_t K, const Row* rows, int64_t nb, float* y,
                              int64_t ldy) {
  int64_t i = 0;
  for (; i + NN <= nb; i += NN) tile<MT, NN>(xs, Kp, K, rows + i, y + i, ldy);
  // The rows left over, fewer than NN: one narrower tile.
  if constexpr (NN > 1) {
    const int64_t left = nb - i;
    if (left == 0) return;
    [&]<int... R>(std::integer_sequence<int, R...>) {
      ((left == R + 1 ? tile<MT, R + 1>(xs, Kp, K, rows + i, y + i, ldy) : void()), ...);
    }(std::make_integer_sequence<int, NN - 1>{});
  }
}

template <typename Row>
BALLAST_AVX512 void product(const float* xs, int64_t T, int64_t K, const Row* rows, int64_t nb, float* y,
                            int64_t ldy) {
  const int64_t Kp = split_width(K);
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) tile_rows<Row, 4, widest(4)>(xs + t * Kp, Kp, K, rows, nb, y + t * ldy, ldy);
  switch (T - t) {
    case 3: tile_rows<Row, 3, widest(3)>(xs + t * Kp, Kp, K, rows, nb, y + t * ldy, ldy); break;
    case 2: tile_rows<Row, 2, widest(2)>(xs + t * Kp, Kp, K, rows, nb, y + t * ldy, ldy); break;
    case 1: tile_rows<Row, 1, widest(1)>(xs + t * Kp, Kp, K, rows, nb, y + t * ldy, ldy); break;
    default: break;
  }
}

constexpr int64_t kMaxRows = 64;  // rows per call (matmul.cpp's blocks)

}  // namespace

void rows_product(const float* xs, int64_t T, int64_t K, const void* w, DType dt, int64_t nb, const float* scales,
                  int64_t scale_row0, int64_t scales_ld, float* y, int64_t ldy) {
  for (int64_t b0 = 0; b0 < nb; b0 += kMaxRows) {
    const int64_t n = std::min(kMaxRows, nb - b0);
    if (dt == DType::BF16) {
      Bf16Row rows[kMaxRows];
      for (int64_t i = 0; i < n; ++i) rows[i] = {static_cast<const uint16_t*>(w) + (b0 + i) * K};
      product(xs, T, K, rows, n, y + b0, ldy);
    } else {
      Fp8Row rows[kMaxRows];
      for (int64_t i = 0; i < n; ++i)
        rows[i] = {static_cast<const uint8_t*>(w) + (b0 + i) * K,
                   scales + ((scale_row0 + b0 + i) / kScaleBlock) * scales_ld};
      product(xs, T, K, rows, n, y + b0, ldy);
    }
  }
}

#else  // not x86-64 with GCC or Clang: never available, never called

bool available() { return false; }
void split_rows(const float*, int64_t, int64_t, float*) {}
void rows_product(const float*, int64_t, int64_t, const void*, DType, int64_t, const float*, int64_t, int64_t,
                  float*, int64_t) {}

#endif

}  // namespace ballast::kernels::cpu::avx512
