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
// uninitialised-use warnings report at every inlined call (false positives; clang has neither).
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
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
  BALLAST_AVX512 __attribute__((always_inline)) inline void load(int64_t k, __mmask32 mask, bool full, __m512& even,
                                                                 __m512& odd) const {
    const __m512i v = full ? _mm512_loadu_si512(w + k) : _mm512_maskz_loadu_epi16(mask, w + k);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
  }
  template <int kLocality>
  void prefetch(int64_t k, int64_t ahead) const {
    __builtin_prefetch(w + k + ahead, 0, kLocality);
  }
  // No scales: what a step's rows share (see Fp8Row) is nothing.
  struct Shared {};
  static Shared shared(const Bf16Row*, int64_t) { return {}; }
  BALLAST_AVX512 static void scale(const Shared&, __m512&, __m512&) {}
};

// e4m3 magnitude bits shifted into an fp32's exponent and mantissa read as 2^-120 times the
// value (subnormals included: they land on fp32 subnormals), then times 2^120 s, s the block scale:
// exact for s < 2^7 (2^120 s is then a finite float), so one rounding, as e4m3(q) * s (larger scales
// multiply by 2^120 and s in turn: the same product). The bytes are sign-extended to 16 bits, so
// that one shift of a 32-bit lane puts an element's magnitude at bits 20-26 and a copy of its sign
// at bit 31, and one mask clears the rest: 5 instructions for 32 weights (0x7F / 0xFF, e4m3's NaN,
// come out as +-480). The rows of one call share their block scales (rows_product never lets a call
// cross a 128-row block), so a step reads and broadcasts its scale once for all of them.
struct Fp8Row {
  const uint8_t* w;
  const float* s;  // this row's block scales, one per 128 columns
  BALLAST_AVX512 __attribute__((always_inline)) inline void load(int64_t k, __mmask32 mask, bool full, __m512& even,
                                                                 __m512& odd) const {
    const __m256i b = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k))
                           : _mm256_maskz_loadu_epi8(mask, w + k);
    const __m512i v = _mm512_cvtepi8_epi16(b);  // lane j: element 2j low, 2j + 1 high
    const __m512i bits = _mm512_set1_epi32(int32_t(0x87F00000u));
    even = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(v, 20), bits));
    odd = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(v, 4), bits));
  }
  template <int kLocality>
  void prefetch(int64_t k, int64_t ahead) const {
    if (k % 64 == 0) __builtin_prefetch(w + k + ahead, 0, kLocality);  // a cache line holds two steps
  }
  struct Shared {
    __m512 first, second;  // 2^120 s and unused, or 2^120 and s
    bool twice;
  };
  BALLAST_AVX512 static Shared shared(const Fp8Row* rows, int64_t k) {
    const float sk = rows[0].s[k / 128];
    if (__builtin_expect(__builtin_fabsf(sk) < 0x1p7f, 1)) return {_mm512_set1_ps(sk * 0x1p120f), _mm512_setzero_ps(), false};
    return {_mm512_set1_ps(0x1p120f), _mm512_set1_ps(sk), true};
  }
  BALLAST_AVX512 __attribute__((always_inline)) static inline void scale(const Shared& sh, __m512& even, __m512& odd) {
    even = _mm512_mul_ps(even, sh.first);
    odd = _mm512_mul_ps(odd, sh.first);
    if (__builtin_expect(sh.twice, 0)) {
      even = _mm512_mul_ps(even, sh.second);
      odd = _mm512_mul_ps(odd, sh.second);
    }
  }
};

// One 32-column step of a tile: MT x rows (stride Kp) against NN weight rows, into acc; each row's
// line `ahead` elements on (the next tile's rows) is asked for as well, into L1 (kLocality 3) or
// only into L2 (2). Every pass over a tile prefetches, not only the first: measured faster (16-row
// expert products 1.05-1.2x), as a burst of prefetches in one pass finds the miss buffers full.
template <int MT, int NN, int kLocality, typename Row>
BALLAST_AVX512 __attribute__((always_inline)) inline void step(const float* xs, int64_t Kp, const Row* rows, int64_t k,
                                                               __mmask32 mask, bool full, int64_t ahead,
                                                               __m512 (&acc)[MT][NN]) {
  __m512 xe[MT], xo[MT];
  for (int t = 0; t < MT; ++t) {
    xe[t] = _mm512_loadu_ps(xs + t * Kp + k);
    xo[t] = _mm512_loadu_ps(xs + t * Kp + k + 16);
  }
  const typename Row::Shared shared = Row::shared(rows, k);
  for (int r = 0; r < NN; ++r) {
    rows[r].template prefetch<kLocality>(k, ahead);
    __m512 we, wo;
    rows[r].load(k, mask, full, we, wo);
    Row::scale(shared, we, wo);
    for (int t = 0; t < MT; ++t) {
      acc[t][r] = _mm512_fmadd_ps(xe[t], we, acc[t][r]);
      acc[t][r] = _mm512_fmadd_ps(xo[t], wo, acc[t][r]);
    }
  }
}

// The lane sums of a, b, c and d, in this order.
BALLAST_AVX512 __attribute__((always_inline)) inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}
BALLAST_AVX512 __attribute__((always_inline)) inline __m128 sum_lanes4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// y[t * ldy + r] = xs[t] . row r, for MT x rows (stride Kp) and NN weight rows.
template <int MT, int NN, int kLocality, typename Row>
BALLAST_AVX512 void tile(const float* xs, int64_t Kp, int64_t K, const Row* rows, float* y, int64_t ldy) {
  __m512 acc[MT][NN];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NN; ++r) acc[t][r] = _mm512_setzero_ps();
  const int64_t ahead = NN * K;  // rows are consecutive: the next tile's rows start there
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step<MT, NN, kLocality>(xs, Kp, rows, k, ~__mmask32(0), true, ahead, acc);
  if (k < K) step<MT, NN, kLocality>(xs, Kp, rows, k, __mmask32((1u << (K - k)) - 1), false, ahead, acc);
  // Lane sums four accumulators at a time (fewer shuffles than one at a time), in (t, r) order.
  constexpr int n = MT * NN, n4 = n / 4 * 4;
  const __m512* a = &acc[0][0];
  float out[n];
  for (int i = 0; i < n4; i += 4) _mm_storeu_ps(out + i, sum_lanes4(a[i], a[i + 1], a[i + 2], a[i + 3]));
  for (int i = n4; i < n; ++i) out[i] = _mm512_reduce_add_ps(a[i]);
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NN; ++r) y[t * ldy + r] = out[t * NN + r];
}

// f.template operator()<n>() for the n in [1, N] that equals `n` (a tile of fewer rows or x rows
// than the widest, chosen at run time).
template <int N, typename F>
inline void with_count(int64_t n, const F& f) {
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((n == R + 1 ? f.template operator()<R + 1>() : void()), ...);
  }(std::make_integer_sequence<int, N>{});
}

// The widest tile of MT x rows that keeps accumulators, x and the widened weights within the 32
// vector registers: 4 x 5 (20 + 8 + 2), 3 x 6, 2 x 8, 1 x 8.
constexpr int widest(int mt) { return mt == 4 ? 5 : mt == 3 ? 6 : 8; }

// Few x rows (decode): one pass over the weight rows in tiles of MT x widest(MT), each row read
// once, the next tile's rows prefetched: into L2 only where the weights stream from memory (the
// loads find them there, and L1's miss buffers are left to the loads: one-core decode of the
// mid-size model +3%), into L1 for the rest (the demo model's, cached, decodes ~9% slower the other
// way; docs/perf.md).
template <int MT, typename Row>
BALLAST_AVX512 void few_rows(const float* xs, int64_t Kp, int64_t K, const Row* rows, int64_t nb, float* y,
                             int64_t ldy, bool weights_stream) {
  constexpr int NN = widest(MT);
  const auto tiles = [&]<int L>() {
    int64_t i = 0;
    for (; i + NN <= nb; i += NN) tile<MT, NN, L>(xs, Kp, K, rows + i, y + i, ldy);
    with_count<NN - 1>(nb - i, [&]<int R>() { tile<MT, R, L>(xs, Kp, K, rows + i, y + i, ldy); });
  };
  if (weights_stream) tiles.template operator()<2>();
  else tiles.template operator()<3>();
}

// Many x rows: tiles of 4 x 5, row tiles outer. A tile's 5 weight rows come from memory once (the
// next ones prefetched into L1 meanwhile: into L2 only, prefill of 512 tokens lost ~5%) and stay in
// L1 while every x tile of a chunk (x rows that fit in 256 KB of L2) passes them; later chunks find
// the block's rows in L2.
template <typename Row>
BALLAST_AVX512 void many_rows(const float* xs, int64_t T, int64_t Kp, int64_t K, const Row* rows, int64_t nb,
                              float* y, int64_t ldy) {
  constexpr int NN = widest(4);
  const int64_t chunk = std::max<int64_t>(4, (int64_t(1) << 16) / Kp / 4 * 4);
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t c1 = std::min(T, c0 + chunk);
    auto row_tile = [&]<int R>(int64_t i) {
      int64_t t = c0;
      for (; t + 4 <= c1; t += 4) tile<4, R, 3>(xs + t * Kp, Kp, K, rows + i, y + t * ldy + i, ldy);
      with_count<3>(c1 - t, [&]<int M>() { tile<M, R, 3>(xs + t * Kp, Kp, K, rows + i, y + t * ldy + i, ldy); });
    };
    int64_t i = 0;
    for (; i + NN <= nb; i += NN) row_tile.template operator()<NN>(i);
    with_count<NN - 1>(nb - i, [&]<int R>() { row_tile.template operator()<R>(i); });
  }
}

template <typename Row>
BALLAST_AVX512 void product(const float* xs, int64_t T, int64_t K, const Row* rows, int64_t nb, float* y,
                            int64_t ldy, bool weights_stream) {
  const int64_t Kp = split_width(K);
  if (T >= 4) return many_rows(xs, T, Kp, K, rows, nb, y, ldy);
  with_count<3>(T, [&]<int M>() { few_rows<M>(xs, Kp, K, rows, nb, y, ldy, weights_stream); });
}

constexpr int64_t kMaxRows = 64;  // rows per call (matmul.cpp's blocks)

}  // namespace

void rows_product(const float* xs, int64_t T, int64_t K, const void* w, DType dt, int64_t nb, const float* scales,
                  int64_t scale_row0, int64_t scales_ld, float* y, int64_t ldy, bool weights_stream) {
  // Calls of at most kMaxRows rows that never cross a block of 128 rows (FP8's rows then share
  // their scales: Fp8Row::shared).
  for (int64_t b0 = 0, n = 0; b0 < nb; b0 += n) {
    n = std::min({kMaxRows, nb - b0, kScaleBlock - (scale_row0 + b0) % kScaleBlock});
    if (dt == DType::BF16) {
      Bf16Row rows[kMaxRows];
      for (int64_t i = 0; i < n; ++i) rows[i] = {static_cast<const uint16_t*>(w) + (b0 + i) * K};
      product(xs, T, K, rows, n, y + b0, ldy, weights_stream);
    } else {
      Fp8Row rows[kMaxRows];
      for (int64_t i = 0; i < n; ++i)
        rows[i] = {static_cast<const uint8_t*>(w) + (b0 + i) * K,
                   scales + ((scale_row0 + b0 + i) / kScaleBlock) * scales_ld};
      product(xs, T, K, rows, n, y + b0, ldy, weights_stream);
    }
  }
}

#else  // not x86-64 with GCC or Clang: never available, never called

bool available() { return false; }
void split_rows(const float*, int64_t, int64_t, float*) {}
void rows_product(const float*, int64_t, int64_t, const void*, DType, int64_t, const float*, int64_t, int64_t,
                  float*, int64_t, bool) {}

#endif

}  // namespace ballast::kernels::cpu::avx512
