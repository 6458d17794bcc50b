// CudaOps::matmul: y[T, N] = x[T, K] @ w[N, K]^T, x and y F32, w F32, BF16, F16, F8_E4M3 or
// F8_E4M3_B128 (Qwen's block-scaled FP8: each element times its 128 x 128 block's scale) read in
// place, fp32 accumulation (fp32 FMA; no TF32, no tensor cores: results are held to the fp32 CPU
// reference). Two paths:
//   few rows (T <= 8, decode): bandwidth-bound. One warp per R weight rows (R = 1, 2 or 4 by T),
//     the warps of up to 4 weights of one input in one launch (matmul_many; of one dtype, or FP8
//     beside bf16); lanes stride over K with 16-byte weight loads, the x values of their k reused
//     over the R weight rows, block-scaled loads multiplied by their block's scale; warp-shuffle
//     reduction. Each weight byte is read once. swiglu_down's few-row products are the same
//     kernels with silu(gate) * up formed as x is loaded and the row gate applied at the store.
//   many rows: a tiled SIMT GEMM, BM x 128 tiles (BM = 32, 64 or 128 by T), K-steps of 16, each
//     thread an 8 x 8 block of outputs (4 x 8 in 32-row tiles); x and the weights (widened to fp32
//     as they are stored) go through double-buffered shared memory, the next step's loads in
//     flight while this one is multiplied. When the tiles are too few to fill the GPU, K is split
//     over blockIdx.z into partial sums in scratch (sized from the shapes), then summed in a fixed
//     order.
// With bf16 matrix products (CudaOptions::bf16_matmul, the default outside the reference tests),
// the many-rows path goes to the tensor cores instead: BF16 and F16 weights on cuBLAS, x rounded to
// the weights' 16-bit type; block-scaled FP8 on the FP8 tensor cores (cuBLASLt, x quantized per
// 128-block of k) where the shapes allow, else dequantized to bf16 for cuBLAS; fp32 accumulation
// and output (what vLLM and SGLang compute). From 3 to 32 rows BF16 and block-scaled FP8 weights
// take the tensor cores on a few-row path of their own (mma.sync, 16 weight rows a block; below).
// Both have a vectorised form (rows aligned for vector loads: K a multiple of 16 bytes in the
// few-rows kernel, of 4 elements in the GEMM) and an element-wise form for any K or alignment.
#include <cublasLt.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <tuple>

#include "ballast/kernels/cuda/cuda_mma_support.cuh"
#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_rows_support.cuh"
#include "ballast/kernels/cuda/cuda_support.cuh"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

// A norm split over two launches (PendingNorm): matmul_add_norm's or moe_routed_add_norm's, then the
// products of matmul_many_normed (cuda_ops.h declares it).
struct ResidualNorm {
  float* x = nullptr;         // norm_partials: the residual stream [1, N], the product added in place
  const void* w = nullptr;    // norm_partials: the norm's weights [N]
  DType wdt = DType::F32;
  float* partials = nullptr;  // one a block of the first launch
  int64_t count = 0;          // norm_scaled: how many
  float eps = 0;              // norm_scaled
  float* h = nullptr;         // norm_scaled: rms_norm(x) [1, K], or null (not stored)
};

using cuda::cdiv;
using cuda::check_cuda;
using cuda::check_launch;
using cuda::expect_device;
using cuda::launch;
using cuda::load4_after_wait;
using cuda::load_u4_after_wait;
using cuda::load_after_wait;
using cuda::bf16_pair;
using cuda::mma_bf16;
using cuda::mma_e4m3;
using cuda::quantize_b128;
using cuda::sigmoidf_;
using cuda::silu_;
using cuda::wait_for_prior_kernels;
using namespace cuda::rows;

namespace {

// ============================================================================================
// Few rows (T <= 8)
// ============================================================================================

constexpr int kFewRowsMax = 8;
constexpr int kSwigluFusedRowsMax = 2;  // rows up to which swiglu_down forms silu(gate) * up in its product
constexpr int kFewThreads = 128;  // 4 warps a block

// Weight rows per warp (of a launch whose first weight type is W): more x rows read per weight
// element want more reuse of the x registers. With one x row, FP8 rows take two a warp (a row of
// 2,048 is one step of 4 loads a lane: too little work for a warp) and 16-bit rows one (two a warp
// measured slower). 80B shape, A/B in one run: FP8 batch 1 / 2 +5.5% / +13%, bf16 batch 1 -3%
// with two rows (kept at one), batch 2 +5%.
template <int T, typename W>
constexpr int few_rows_per_warp() {
  return T == 1 ? (sizeof(W) == 1 ? 2 : 1) : (T <= 4 ? 2 : 4);
}
// Weight elements a lane reads per step: 16 bytes (F32: 4, BF16/F16: 8, F8: 16); the loads of a
// step in flight hold 4 E weights a lane.
template <typename W, bool VEC>
constexpr int few_elems() {
  return VEC ? 16 / int(sizeof(W)) : 1;
}

// The products of one launch: up to kFewTargetsMax weights (same dtype and K) applied to the same
// x rows (the projections of one input), their warps numbered one after the other.
constexpr int kFewTargetsMax = 4;
struct FewRowsTarget {
  const void* w;
  int64_t N;
  float* y;
  int64_t ldy;
  int64_t warps_end;  // this target's warps end here (the previous target's end is where they start)
  const float* s;     // block scales [cdiv(N, 128), cdiv(K, 128)] of F8_E4M3_B128 weights, else null
  bool alt;           // of the launch's second weight type (few_rows_kernel's WB)
};
struct FewRowsTargets {
  FewRowsTarget t[kFewTargetsMax];
  int count;
};

// What a few-row product does besides y = x @ w^T.
enum class XIn {
  plain,
  swiglu,         // x is silu(x) * u: x the gate, u the up values (swiglu_down)
  norm_partials,  // one row; the residual stream gets the product added, y the sum times (1 + the norm's
                  // weights), and each block's sum of the squared sums goes to rn.partials
                  // (matmul_add_norm at one row)
  norm_scaled,    // one row; the sums times the row's RMS factor from rn.partials, and h = x times it
                  // stored (matmul_many_normed at one row: x is the pending norm's s)
};

// The row's RMS factor from the first launch's partial sums, in two halves: a lane's share (after
// the wait; no shuffles, so that lanes may call it from different places), then the warp's sum of
// the shares (every warp the same order: the same float) as 1 / sqrt(mean + eps), as norm_kernel
// (there the mean is taken in double).
__device__ __forceinline__ float norm_partials_of_lane(const ResidualNorm& rn, int lane) {
  float p = 0.0f;
  for (int64_t i = lane; i < rn.count; i += 32) p += load_after_wait(rn.partials + i);
  return p;
}
__device__ __forceinline__ float norm_factor(const ResidualNorm& rn, int64_t K, float p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) p += __shfl_xor_sync(0xffffffffu, p, off);
  return 1.0f / sqrtf(p / float(K) + rn.eps);
}

// x's E values at x + at: as stored, or (SWIGLU: x is the gate, u the up values at the same
// offsets) silu(x) * u, the same floats silu_mul writes. Loaded as what the kernel before wrote
// (load_after_wait): the few-row products issue their weight loads before waiting for it.
template <bool SWIGLU, int E>
__device__ __forceinline__ void load_x(const float* x, const float* u, int64_t at,
                                       float (&xv)[E]) {
  if constexpr (E % 4 == 0) {
#pragma unroll
    for (int q = 0; q < E / 4; ++q) {
      float4 v = load4_after_wait(x + at + 4 * q);
      if constexpr (SWIGLU) {
        const float4 b = load4_after_wait(u + at + 4 * q);
        v = make_float4(silu_(v.x) * b.x, silu_(v.y) * b.y, silu_(v.z) * b.z, silu_(v.w) * b.w);
      }
      xv[4 * q] = v.x, xv[4 * q + 1] = v.y, xv[4 * q + 2] = v.z, xv[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e)
      xv[e] = SWIGLU ? silu_(load_after_wait(x + at + e)) * load_after_wait(u + at + e) : load_after_wait(x + at + e);
  }
}

// One warp's rows n0 .. n0 + R of y = x @ w^T. TM: the number of x rows (EXACT) or an upper bound
// on `nt` (the element-wise fallback). SCALED: block-scaled FP8 (W = f8e4m3): a lane's E elements
// lie in one 128-block of k (E divides 128), so each load is multiplied by one scale. SWIGLU: x
// is silu(x) * up (load_x); row_gate (if not null): y[t, :] times sigmoid(row_gate[t]).
// The weights are parameters (ops.h): the first step's weight loads are issued before waiting for
// the kernel before (wait_for_prior_kernels), so that they stream during its tail; x, up and
// row_gate, which it may have written, are read after (80B FP8 decode, A/B: batch 1 +3.5%).
// MODE (XIn) beside SWIGLU's: norm_partials and norm_scaled as rn says (one row, TM = 1); the
// warp's sum of squared sums (norm_partials) or the row's factor (norm_scaled) is left in `extra`.
template <typename W, int TM, int R, bool VEC, bool EXACT, bool SCALED, XIn MODE>
__device__ __forceinline__ void few_rows_warp(const float* x, const float* up, int64_t ldx,
                                              int nt, int64_t K, const W* __restrict__ w, const float* __restrict__ s,
                                              int64_t N, float* __restrict__ y, int64_t ldy,
                                              const float* row_gate, int64_t n0, int lane, const ResidualNorm& rn,
                                              float& extra) {
  constexpr bool SWIGLU = MODE == XIn::swiglu;
  constexpr bool NORM = MODE == XIn::norm_partials || MODE == XIn::norm_scaled;
  static_assert(!NORM || TM == 1, "the split norm is of one row");
  float xres[R], wn[R];  // norm_partials: the residual stream and 1 + the norm's weights at this warp's rows
  float factor = 1.0f;   // norm_scaled: the lane's share of the partial sums, then the row's factor
  const auto wait_then_norm_loads = [&] {  // the wait, then what the split norm reads after it
    wait_for_prior_kernels();
    if constexpr (MODE == XIn::norm_partials) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t n = n0 + r < N ? n0 + r : N - 1;
        xres[r] = load_after_wait(rn.x + n);
        wn[r] = 1.0f + load_weight(rn.w, rn.wdt, n);
      }
    }
    if constexpr (MODE == XIn::norm_scaled) factor = norm_partials_of_lane(rn, lane);
  };
  constexpr int E = few_elems<W, VEC>();
  constexpr int WORDS = VEC ? E * int(sizeof(W)) / 4 : 0;
  constexpr int U = 4 / R;  // steps whose weight loads are issued together: 4 loads in flight per lane
  bool wait_after_first_loads = true;

  const W* wr[R];
  const float* sr[R];  // SCALED: the scales of each row's 128-row block
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r < N ? n0 + r : N - 1;  // past N: a valid row, not written
    wr[r] = w + n * K;
    if constexpr (SCALED) sr[r] = s + (n / kScaleBlock) * cdiv(K, int64_t(kScaleBlock));
  }

  float acc[R][TM];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TM; ++t) acc[r][t] = 0.0f;

  constexpr int64_t kStep = int64_t(32) * E;
  if constexpr (VEC && TM <= 2) {
    // One or two x rows (decode): the loads in flight stay raw words until their step's products,
    // so that a lane holds 4 steps x R rows x 16 bytes of weights in 16 R registers, not 4 E R
    // floats (64 R for FP8): more warps fit an SM, more loads are in flight, and a warp's R rows
    // share its x loads. A weight is unpacked once per x row; the sums are the same.
    constexpr int UR = 4;
    for (int64_t kb = int64_t(lane) * E; kb < K; kb += UR * kStep) {
      Words<WORDS> raw[UR][R];
      float sc[UR][R];
#pragma unroll
      for (int u = 0; u < UR; ++u) {
        const int64_t k = kb + u * kStep;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (k < K) {
            raw[u][r] = load_words<WORDS>(wr[r] + k);
            if constexpr (SCALED) sc[u][r] = __ldg(sr[r] + k / kScaleBlock);
          }
        }
      }
      if (wait_after_first_loads) {  // the weights are on their way while the kernel before finishes
        wait_then_norm_loads();
        wait_after_first_loads = false;
      }
#pragma unroll
      for (int u = 0; u < UR; ++u) {
        const int64_t k = kb + u * kStep;
        if (k >= K) break;
#pragma unroll
        for (int t = 0; t < TM; ++t) {
          if (t >= nt) break;
          float xv[E];
          load_x<SWIGLU>(x, up, t * ldx + k, xv);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float wv[E];
            unpack_words<W, WORDS>(raw[u][r], wv);
            if constexpr (SCALED) {
#pragma unroll
              for (int e = 0; e < E; ++e) wv[e] *= sc[u][r];
            }
#pragma unroll
            for (int e = 0; e < E; ++e) acc[r][t] = fmaf(xv[e], wv[e], acc[r][t]);
          }
        }
      }
    }
  } else {
    for (int64_t kb = int64_t(lane) * E; kb < K; kb += U * kStep) {
      float wv[U][R][E];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = kb + u * kStep;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (k < K) {
            if constexpr (VEC) {
              unpack_words<W, WORDS>(load_words<WORDS>(wr[r] + k), wv[u][r]);
            } else {
              wv[u][r][0] = to_float(wr[r][k]);
            }
            if constexpr (SCALED) {
              const float sc = __ldg(sr[r] + k / kScaleBlock);
#pragma unroll
              for (int e = 0; e < E; ++e) wv[u][r][e] *= sc;
            }
          } else {
#pragma unroll
            for (int e = 0; e < E; ++e) wv[u][r][e] = 0.0f;
          }
        }
      }
      if (wait_after_first_loads) {
        wait_then_norm_loads();
        wait_after_first_loads = false;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = kb + u * kStep;
        if (k >= K) break;
#pragma unroll
        for (int t = 0; t < TM; ++t) {
          if (t >= nt) break;
          float xv[E];
          load_x<SWIGLU>(x, up, t * ldx + k, xv);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int e = 0; e < E; ++e) acc[r][t] = fmaf(xv[e], wv[u][r][e], acc[r][t]);
        }
      }
    }
  }
  if (wait_after_first_loads) wait_then_norm_loads();  // a lane past K (no loads) before it stores
  if constexpr (MODE == XIn::norm_scaled) factor = norm_factor(rn, K, factor);  // (every lane here)

  float sq = 0.0f;  // norm_partials
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TM; ++t) {
      if (t >= nt) break;
      float v = acc[r][t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (row_gate) v *= sigmoidf_(load_after_wait(row_gate + t));
      if constexpr (MODE == XIn::norm_scaled) v *= factor;
      if (lane == ((r * TM + t) & 31) && n0 + r < N) {
        if constexpr (MODE == XIn::norm_partials) {
          const float sum = xres[r] + v;
          rn.x[n0 + r] = sum;
          y[n0 + r] = sum * wn[r];
          sq = fmaf(sum, sum, sq);
        } else {
          y[t * ldy + n0 + r] = v;
        }
      }
    }
  if constexpr (MODE == XIn::norm_partials) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    extra = sq;
  }
  if constexpr (MODE == XIn::norm_scaled) extra = factor;
}

// The warps of up to kFewTargetsMax products, numbered one after the other. Targets of two weight
// types may share a launch (WA, SA and WB, SB; `alt` picks the second): a block-scaled FP8 model
// keeps a few projections in bf16 (routers, DeltaNet a/b) beside FP8 ones of the same input.
// SWIGLU (one target): x is the gate, u the up values (swiglu_down; row_gate as few_rows_warp's).
// norm_partials (one target) and norm_scaled: as few_rows_warp's MODE; the first's blocks each
// store their warps' sums of squared sums, the second's warps store h in turn, 128 elements each.
template <typename WA, bool SA, typename WB, bool SB, int TM, bool VEC, bool EXACT, XIn MODE>
__global__ void __launch_bounds__(kFewThreads, TM <= 4 ? 4 : 3)
    few_rows_kernel(const float* x, const float* u, int64_t ldx, int nt_arg, int64_t K,
                    FewRowsTargets tg, const float* row_gate, ResidualNorm rn) {
  constexpr bool SWIGLU = MODE == XIn::swiglu;
  constexpr int R = few_rows_per_warp<TM, WA>();
  const int lane = int(threadIdx.x) & 31;
  const int64_t gwarp = int64_t(blockIdx.x) * (kFewThreads / 32) + int64_t(threadIdx.x) / 32;
  // This warp's target (selected without indexing the parameters dynamically).
  const void* w = tg.t[0].w;
  const float* s = tg.t[0].s;
  int64_t N = tg.t[0].N, ldy = tg.t[0].ldy, warp = gwarp;
  float* y = tg.t[0].y;
  bool alt = tg.t[0].alt;
#pragma unroll
  for (int q = 1; q < kFewTargetsMax; ++q)
    if (q < tg.count && gwarp >= tg.t[q - 1].warps_end) {
      w = tg.t[q].w, N = tg.t[q].N, ldy = tg.t[q].ldy, y = tg.t[q].y, s = tg.t[q].s, alt = tg.t[q].alt;
      warp = gwarp - tg.t[q - 1].warps_end;
    }
  const int64_t n0 = warp * R;
  const int nt = EXACT ? TM : nt_arg;
  float extra = 0.0f;
  if (n0 < N) {
    if ((std::is_same_v<WA, WB> && SA == SB) || !alt)
      few_rows_warp<WA, TM, R, VEC, EXACT, SA, MODE>(x, u, ldx, nt, K, static_cast<const WA*>(w), s, N, y, ldy,
                                                     row_gate, n0, lane, rn, extra);
    else if constexpr (!SWIGLU)
      few_rows_warp<WB, TM, R, VEC, EXACT, SB, MODE>(x, u, ldx, nt, K, static_cast<const WB*>(w), s, N, y, ldy,
                                                     row_gate, n0, lane, rn, extra);
  } else if constexpr (MODE != XIn::norm_partials) {
    return;  // the whole warp leaves together: the shuffles above see full warps
  }
  if constexpr (MODE == XIn::norm_partials) {  // every warp of the block here, one order of sums
    __shared__ float block_sq[kFewThreads / 32];
    if (lane == 0) block_sq[threadIdx.x / 32] = extra;
    __syncthreads();
    if (threadIdx.x == 0) {
      float b = 0.0f;
#pragma unroll
      for (int q = 0; q < kFewThreads / 32; ++q) b += block_sq[q];
      rn.partials[blockIdx.x] = b;
    }
  }
  if constexpr (MODE == XIn::norm_scaled) {  // h = x * factor, the launch's warps in turn (if asked for)
    if (rn.h == nullptr) return;
    const int64_t warps = tg.t[tg.count - 1].warps_end;
    for (int64_t k = (gwarp * 32 + lane) * 4; k < K; k += warps * 128) {
      const float4 v = load4_after_wait(x + k);
      *reinterpret_cast<float4*>(rn.h + k) = make_float4(v.x * extra, v.y * extra, v.z * extra, v.w * extra);
    }
  }
}

// Numbers the targets' warps (R weight rows each) and launches one grid for all of them.
// Returns the number of blocks (norm_partials: of partial sums).
template <typename WA, bool SA, typename WB, bool SB, int TM, bool VEC, bool EXACT, XIn MODE>
int64_t launch_few_rows_targets(const float* x, int64_t ldx, int T, int64_t K, FewRowsTargets tg, cudaStream_t stream,
                                const float* u, const float* row_gate, const ResidualNorm& rn) {
  constexpr int R = few_rows_per_warp<TM, WA>();
  int64_t warps = 0;
  for (int q = 0; q < tg.count; ++q) tg.t[q].warps_end = warps += cdiv(tg.t[q].N, R);
  const int64_t blocks = cdiv(warps, kFewThreads / 32);
  check(blocks <= 2147483647, "matmul: {} weight rows are too many for one launch", warps * R);
  launch(few_rows_kernel<WA, SA, WB, SB, TM, VEC, EXACT, MODE>, unsigned(blocks), kFewThreads, 0, stream, x, u, ldx,
         T, K, tg, row_gate, rn);
  return blocks;
}

// The targets of weight type W (SCALED: block-scaled FP8), or with a second type WB, SB for the
// targets marked `alt`. MODE (XIn) swiglu (swiglu_down, one target): x is the gate, silu(x) * up
// formed as it is loaded, and row_gate (if not null) applied at the store; norm_partials and
// norm_scaled (one row, the vector path only: the caller checks norm_rows_fit): as rn says.
// Returns the number of blocks launched.
template <typename W, bool SCALED = false, typename WB = W, bool SB = SCALED, XIn MODE = XIn::plain>
int64_t launch_few_rows(const float* x, int64_t ldx, int T, int64_t K, const FewRowsTargets& tg, cudaStream_t stream,
                        const float* up = nullptr, const float* row_gate = nullptr, const ResidualNorm& rn = {}) {
  static_assert(!SCALED || std::is_same_v<W, f8e4m3>, "block scales are FP8's");
  constexpr bool SWIGLU = MODE == XIn::swiglu, NORM = MODE == XIn::norm_partials || MODE == XIn::norm_scaled;
  constexpr int EA = few_elems<W, true>(), EB = few_elems<WB, true>();
  bool vec = K % EA == 0 && K % EB == 0 && ldx % 4 == 0 && aligned(x, 16) && (!SWIGLU || aligned(up, 16));
  for (int q = 0; q < tg.count; ++q) vec = vec && aligned(tg.t[q].w, 16);
  constexpr int TMAX = SWIGLU ? kSwigluFusedRowsMax : NORM ? 1 : kFewRowsMax;
  check(T <= TMAX, "matmul: {} rows for a few-row product of at most {}", T, TMAX);
  if constexpr (NORM) {
    check(vec, "matmul: the split norm's products need whole vector steps");  // norm_rows_fit: never
    return launch_few_rows_targets<W, SCALED, WB, SB, 1, true, true, MODE>(x, ldx, T, K, tg, stream, up, row_gate, rn);
  } else {
    if (!vec)
      return launch_few_rows_targets<W, SCALED, WB, SB, TMAX, false, false, MODE>(x, ldx, T, K, tg, stream, up,
                                                                                 row_gate, rn);
    const auto run = [&](auto tm) {  // T x rows, exactly
      return launch_few_rows_targets<W, SCALED, WB, SB, decltype(tm)::value, true, true, MODE>(x, ldx, T, K, tg,
                                                                                              stream, up, row_gate, rn);
    };
    if constexpr (SWIGLU) {
      if (T == 1) return run(std::integral_constant<int, 1>{});
      return run(std::integral_constant<int, kSwigluFusedRowsMax>{});
    } else {
      switch (T) {
        case 1: return run(std::integral_constant<int, 1>{});
        case 2: return run(std::integral_constant<int, 2>{});
        case 3: return run(std::integral_constant<int, 3>{});
        case 4: return run(std::integral_constant<int, 4>{});
        case 5: return run(std::integral_constant<int, 5>{});
        case 6: return run(std::integral_constant<int, 6>{});
        case 7: return run(std::integral_constant<int, 7>{});
        default: return run(std::integral_constant<int, 8>{});
      }
    }
  }
}

// Whether the weights may share one few-row launch: all of one dtype, or block-scaled FP8 beside
// bf16 (an FP8 model's unquantized projections); `same` says which.
bool few_rows_dtypes_share(std::span<const Tensor> w, bool& same) {
  bool fp8_bf16 = true;
  same = true;
  for (const Tensor& t : w) {
    same = same && t.dtype() == w[0].dtype();
    fp8_bf16 = fp8_bf16 && (t.dtype() == DType::F8_E4M3_B128 || t.dtype() == DType::BF16);
  }
  return same || fp8_bf16;
}

// launch_few_rows with the weight types of `dt` (same: every target's; else block-scaled FP8 beside
// bf16). Returns the blocks launched.
template <XIn MODE>
int64_t launch_few_rows_of(DType dt, bool same, const float* x, int T, int64_t K, const FewRowsTargets& tg,
                           cudaStream_t stream, const ResidualNorm& rn = {}) {
  if (!same) return launch_few_rows<f8e4m3, true, __nv_bfloat16, false, MODE>(x, K, T, K, tg, stream, nullptr, nullptr, rn);
  switch (dt) {
    case DType::F32: return launch_few_rows<float, false, float, false, MODE>(x, K, T, K, tg, stream, nullptr, nullptr, rn);
    case DType::BF16:
      return launch_few_rows<__nv_bfloat16, false, __nv_bfloat16, false, MODE>(x, K, T, K, tg, stream, nullptr, nullptr,
                                                                               rn);
    case DType::F16:
      return launch_few_rows<__half, false, __half, false, MODE>(x, K, T, K, tg, stream, nullptr, nullptr, rn);
    case DType::F8_E4M3:
      return launch_few_rows<f8e4m3, false, f8e4m3, false, MODE>(x, K, T, K, tg, stream, nullptr, nullptr, rn);
    case DType::F8_E4M3_B128:
      return launch_few_rows<f8e4m3, true, f8e4m3, true, MODE>(x, K, T, K, tg, stream, nullptr, nullptr, rn);
    default: fail("matmul: weight dtype {} is not F32, BF16, F16, F8_E4M3 or F8_E4M3_B128", dtype_name(dt));
  }
}

// ============================================================================================
// Few rows (3 - 32) on the tensor cores: block-scaled FP8 and bf16 weights
// ============================================================================================
// At 3 - 8 x rows the CUDA-core few-row kernels spend their time issuing the per-element work (FP8
// widened, scaled and multiplied with every x row: 0.6 TB/s for DeltaNet's projections at 8 rows,
// docs/perf.md). Here the products are mma.sync with 16 weight rows as A and the x rows as B's 8
// columns: a lane's 16-byte load of a weight row feeds the MMAs as it came from memory (k numbered
// in load order, x's fragments taken in the same order), so nothing is unpacked or scaled per
// weight. A block takes 16 weight rows of one target, its 4 warps a quarter of K each, summed in a
// fixed order through shared memory; the first weights are asked for before the wait for the
// kernel before. From 9 rows each weight fragment feeds 2 or 4 MMAs (NT tiles of 8 x rows): at 32
// rows cuBLASLt's 128 x 128 tiles read an FP8 weight at ~517 GB/s (docs/perf.md, session 30).
//   block-scaled FP8 (m16n8k32 e4m3): x is quantized once a product (per row and 128-block of k,
//     amax / 448, nearest e4m3: what the many-row path, vLLM and SGLang multiply) by its own small
//     kernel; each 128-block's fp32 sum times the two scales. (Session 12 tried this with every
//     block quantizing all of x itself: slower at 8 rows.)
//   bf16 (m16n8k16): x rounded to bf16 as it is loaded (as the many-row path's cuBLAS products take
//     it), fp32 sums; SWIGLU forms silu(x) * up first.

constexpr int kMmaRows = 16;           // weight rows a block (the MMA's M)
constexpr int kMmaWarps = 4;           // warps a block, each a quarter of K
// 128-blocks of k whose loads a warp issues together: 2 (120 registers) measured +1% over 4 (168).
constexpr int kF8BlocksInFlight = 2;
constexpr int kBf16StepsInFlight = 4;  // 32-k steps of bf16 loads a warp issues together (the same bytes)
constexpr int kMmaMinRows = 3;         // fewer x rows: the CUDA-core kernels (their work a weight byte is small)
constexpr int kMmaRowsMax = 32;        // x rows: up to 4 tiles of 8 a weight fragment (FP8: 250 registers at 4)

// Block i's 16 rows: item i of the targets in order (warps_end counting items), selected without
// indexing the parameters dynamically.
struct RowsItem {
  const void* w;
  const float* s;
  int64_t N, ldy, n0;
  float* y;
};
__device__ __forceinline__ RowsItem rows_item(const FewRowsTargets& tg, int64_t item) {
  RowsItem it{tg.t[0].w, tg.t[0].s, tg.t[0].N, tg.t[0].ldy, item * kMmaRows, tg.t[0].y};
#pragma unroll
  for (int q = 1; q < kFewTargetsMax; ++q)
    if (q < tg.count && item >= tg.t[q - 1].warps_end)
      it = RowsItem{tg.t[q].w, tg.t[q].s, tg.t[q].N, tg.t[q].ldy, (item - tg.t[q - 1].warps_end) * kMmaRows, tg.t[q].y};
  return it;
}

// The block's 4 warps' sums (acc[j]: rows g, g, g + 8, g + 8; tokens 8 j + 2 tq, 8 j + 2 tq + 1)
// added in a fixed order and stored, times sigmoid(row_gate[t]) where row_gate is not null.
template <int NT>
__device__ __forceinline__ void store_rows_sums(const float (&acc)[NT][4], const RowsItem& it, int T,
                                                const float* row_gate) {
  __shared__ float sums[kMmaWarps][kMmaRows][8 * NT + 1];  // + 1: a row's readers on distinct banks
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) / 32, g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    sums[warp][g][8 * j + 2 * tq] = acc[j][0], sums[warp][g][8 * j + 2 * tq + 1] = acc[j][1];
    sums[warp][g + 8][8 * j + 2 * tq] = acc[j][2], sums[warp][g + 8][8 * j + 2 * tq + 1] = acc[j][3];
  }
  __syncthreads();
  // 128 threads: 16 rows (consecutive threads, consecutive y) x 8 tokens a pass
  const int row = int(threadIdx.x) % kMmaRows;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int t = 8 * j + int(threadIdx.x) / kMmaRows;
    if (t < T && it.n0 + row < it.N) {
      float v = 0.f;
#pragma unroll
      for (int q = 0; q < kMmaWarps; ++q) v += sums[q][row][t];
      if (row_gate) v *= sigmoidf_(load_after_wait(row_gate + t));
      it.y[t * it.ldy + it.n0 + row] = v;
    }
  }
}

// Block-scaled FP8 weights, the block's item `it`: xq [T, K] e4m3, xs [K / 128, T]: x quantized
// (quantize_rows_b128), NT tiles of 8 rows. row_gate (if not null): y[t, :] times sigmoid(row_gate[t]).
template <int NT>
__device__ __forceinline__ void fp8_rows_item(const uint8_t* xq, const float* xs, int T,
                                              int64_t K, const RowsItem& it, const float* row_gate) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) / 32, g = lane / 4, tq = lane % 4;
  const int64_t KB = K / kScaleBlock, per = cdiv(KB, int64_t(kMmaWarps));
  const int64_t b0 = std::min(KB, warp * per), b1 = std::min(KB, b0 + per);  // this warp's 128-blocks
  const uint8_t* w = static_cast<const uint8_t*>(it.w);
  const uint8_t* wg = w + std::min(it.n0 + g, it.N - 1) * K;  // past N: a valid row, not written
  const uint8_t* wg8 = w + std::min(it.n0 + g + 8, it.N - 1) * K;
  const float* ws = it.s + (it.n0 / kScaleBlock) * KB;  // the 16 rows lie in one 128-row block

  uint4 a[kF8BlocksInFlight][2][2];  // [128-block][64-k half][row g, g + 8]
  const auto issue = [&](int64_t bb) {
#pragma unroll
    for (int q = 0; q < kF8BlocksInFlight; ++q)
      if (bb + q < b1)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t k = (bb + q) * kScaleBlock + h * 64 + tq * 16;
          a[q][h][0] = __ldg(reinterpret_cast<const uint4*>(wg + k));
          a[q][h][1] = __ldg(reinterpret_cast<const uint4*>(wg8 + k));
        }
  };
  issue(b0);
  wait_for_prior_kernels();  // x's quantization has finished
  float acc[NT][4] = {};  // tile j: rows g, g, g + 8, g + 8; tokens 8 j + 2 tq, 8 j + 2 tq + 1
  for (int64_t bb = b0; bb < b1; bb += kF8BlocksInFlight) {
    if (bb != b0) issue(bb);
    // x row 8 j + g at the lane's k of each 64-k half, every block's loads issued before the first
    // MMA (loaded a block at a time, batch 8 measured 2% slower)
    uint4 xb[kF8BlocksInFlight][NT][2];
#pragma unroll
    for (int q = 0; q < kF8BlocksInFlight; ++q)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          xb[q][j][h] = 8 * j + g < T && bb + q < b1
                            ? load_u4_after_wait(xq + (8 * j + g) * K + (bb + q) * kScaleBlock + h * 64 + tq * 16)
                            : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int q = 0; q < kF8BlocksInFlight; ++q) {
      if (bb + q >= b1) break;
      const float sw = __ldg(ws + bb + q);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4& r = a[q][h][0];
          const uint4& r8 = a[q][h][1];
          mma_e4m3(d, r.x, r8.x, r.y, r8.y, xb[q][j][h].x, xb[q][j][h].y);
          mma_e4m3(d, r.z, r8.z, r.w, r8.w, xb[q][j][h].z, xb[q][j][h].w);
        }
        const int t0 = 8 * j + 2 * tq;
        const float s0 = t0 < T ? sw * load_after_wait(xs + (bb + q) * T + t0) : 0.f;
        const float s1 = t0 + 1 < T ? sw * load_after_wait(xs + (bb + q) * T + t0 + 1) : 0.f;
        acc[j][0] = fmaf(d[0], s0, acc[j][0]);
        acc[j][1] = fmaf(d[1], s1, acc[j][1]);
        acc[j][2] = fmaf(d[2], s0, acc[j][2]);
        acc[j][3] = fmaf(d[3], s1, acc[j][3]);
      }
    }
  }
  store_rows_sums<NT>(acc, it, T, row_gate);
}

// bf16 weights: x [T, ldx] rows (SWIGLU: silu(x) * up) rounded to bf16 as they are loaded, NT
// tiles of 8 rows; K a multiple of 32 (a step: 4 lanes x 8 k).
template <bool SWIGLU, int NT>
__device__ __forceinline__ void bf16_rows_item(const float* x, const float* up, int64_t ldx,
                                               int T, int64_t K, const RowsItem& it,
                                               const float* row_gate) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) / 32, g = lane / 4, tq = lane % 4;
  const int64_t KS = K / 32, per = cdiv(KS, int64_t(kMmaWarps));
  const int64_t s0 = std::min(KS, warp * per), s1 = std::min(KS, s0 + per);  // this warp's steps
  const __nv_bfloat16* w = static_cast<const __nv_bfloat16*>(it.w);
  const __nv_bfloat16* wg = w + std::min(it.n0 + g, it.N - 1) * K;  // past N: a valid row, not written
  const __nv_bfloat16* wg8 = w + std::min(it.n0 + g + 8, it.N - 1) * K;

  constexpr int U = kBf16StepsInFlight;
  uint4 a[U][2];  // [step][row g, g + 8]: k = 32 step + 8 tq .. + 7
  const auto issue = [&](int64_t ss) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (ss + u < s1) {
        const int64_t k = (ss + u) * 32 + tq * 8;
        a[u][0] = __ldg(reinterpret_cast<const uint4*>(wg + k));
        a[u][1] = __ldg(reinterpret_cast<const uint4*>(wg8 + k));
      }
  };
  issue(s0);
  wait_for_prior_kernels();  // x was written by the kernel before
  float acc[NT][4] = {};  // tile j: rows g, g, g + 8, g + 8; tokens 8 j + 2 tq, 8 j + 2 tq + 1
  for (int64_t ss = s0; ss < s1; ss += U) {
    if (ss != s0) issue(ss);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (ss + u >= s1) break;
      const uint4& r = a[u][0];
      const uint4& r8 = a[u][1];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint32_t b[4] = {0u, 0u, 0u, 0u};  // x row 8 j + g at the lane's 8 k, as bf16 pairs
        if (8 * j + g < T) {
          float xv[8];
          load_x<SWIGLU>(x, up, (8 * j + g) * ldx + (ss + u) * 32 + tq * 8, xv);
#pragma unroll
          for (int i = 0; i < 4; ++i) b[i] = bf16_pair(xv[2 * i], xv[2 * i + 1]);
        }
        mma_bf16(acc[j], {r.x, r8.x, r.y, r8.y}, b[0], b[1]);
        mma_bf16(acc[j], {r.z, r8.z, r.w, r8.w}, b[2], b[3]);
      }
    }
  }
  store_rows_sums<NT>(acc, it, T, row_gate);
}

// Block i: item i of the FP8 targets (x quantized in xq, xs), then of the bf16 ones (x itself): an
// FP8 model's products of one input in one launch. Where x was quantized by the kernel before, x
// itself was written before that one. F8 / B16: whether there are targets of each kind (a kernel
// for one kind alone keeps that kind's registers). NT: tiles of 8 x rows (1, 2 or 4).
template <bool SWIGLU, bool F8, bool B16, int NT>
__global__ void __launch_bounds__(kMmaWarps * 32)
    mma_rows_kernel(const uint8_t* xq, const float* xs, const float* x, const float* up, int T, int64_t K,
                    FewRowsTargets f8, unsigned f8_items, FewRowsTargets b16, const float* row_gate) {
  if (F8 && (!B16 || blockIdx.x < f8_items)) fp8_rows_item<NT>(xq, xs, T, K, rows_item(f8, blockIdx.x), row_gate);
  else if constexpr (B16)
    bf16_rows_item<SWIGLU, NT>(x, up, K, T, K, rows_item(b16, blockIdx.x - f8_items), row_gate);
}

// Whether the tensor-core few-row path takes the product of T x rows at x (16-byte aligned) with
// the weight w [N, K] (16-byte aligned): block-scaled FP8 where the device has FP8 mma.sync and K
// is whole 128-blocks, bf16 where it has bf16 mma.sync and K is whole 32-k steps. A block reads the
// T x rows for its 16 weight rows: FP8's quantized x is T / 16 bytes a weight byte, bf16's fp32 x
// T / 8. So bf16 products of more than 8 rows take this path only where the weights are few (an FP8
// model's router, DeltaNet a / b and gates: one launch with the FP8 targets); a wide one (the
// lm_head) stays on cuBLAS (2.7 TB/s at 32 rows on an H100, docs/perf.md).
constexpr int64_t kBf16RowsWideN = 1024;
bool mma_rows_take(const CudaDeviceTraits& device, const Tensor& w, int64_t T, int64_t K, int64_t N, const void* x) {
  if (T < kMmaMinRows || T > kMmaRowsMax || K <= 0 || !aligned(x, 16) || !aligned(w.raw(), 16)) return false;
  if (w.dtype() == DType::F8_E4M3_B128) return device.fp8_mma() && K % kScaleBlock == 0;
  if (w.dtype() == DType::BF16) return device.bf16_mma() && K % 32 == 0 && (T <= kFewRowsMax || N <= kBf16RowsWideN);
  return false;
}
size_t fp8_rows_scratch(int64_t T, int64_t K) { return size_t(T * K) + size_t(T * (K / kScaleBlock)) * 4; }

// Numbers the targets' 16-row items (warps_end counting items): the grid of the launch.
unsigned rows_items(FewRowsTargets& tg) {
  int64_t items = 0;
  for (int q = 0; q < tg.count; ++q) tg.t[q].warps_end = items += cdiv(tg.t[q].N, kMmaRows);
  check(items <= 2147483647, "matmul: {} items are too many for one launch", items);
  return unsigned(items);
}

// The FP8 targets (block-scaled, 16-byte aligned rows) and the bf16 ones (16-byte aligned rows) in
// 16-row items, one launch; with FP8 targets x (with up: silu(x) * up, swiglu_down's input) is
// quantized into scratch (fp8_rows_scratch bytes) first.
void launch_mma_rows(const float* x, int T, int64_t K, FewRowsTargets f8, FewRowsTargets b16, void* scratch,
                     cudaStream_t stream, const float* up = nullptr, const float* row_gate = nullptr) {
  uint8_t* xq = static_cast<uint8_t*>(scratch);
  float* xs = xq ? reinterpret_cast<float*>(xq + T * K) : nullptr;
  if (f8.count > 0) {
    quantize_rows_b128(x, T, T, K, xq, xs, stream, up);
    check_launch("matmul: quantizing x to FP8");
  }
  const unsigned f8_items = rows_items(f8), items = f8_items + rows_items(b16);
  const auto tiles = [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    const auto run = [&](auto kernel) {
      launch(kernel, items, kMmaWarps * 32, 0, stream, xq, xs, x, up, T, K, f8, f8_items, b16, row_gate);
    };
    // (FP8's silu(x) * up is formed by the quantization; swiglu_down has one target.)
    if (b16.count == 0) run(mma_rows_kernel<false, true, false, NT>);
    else if (f8.count == 0) run(up ? mma_rows_kernel<true, false, true, NT> : mma_rows_kernel<false, false, true, NT>);
    else run(mma_rows_kernel<false, true, true, NT>);
  };
  if (T <= 8) tiles(std::integral_constant<int, 1>{});
  else if (T <= 16) tiles(std::integral_constant<int, 2>{});
  else tiles(std::integral_constant<int, 4>{});
}

// ============================================================================================
// Many rows: tiled SIMT GEMM
// ============================================================================================

constexpr int kBK = 16;   // K per step
constexpr int kBN = 128;  // weight rows per tile
constexpr int kPad = 4;   // shared rows padded (keeps 16-byte alignment, spreads the transposed stores)

// Rows of x per thread (8 in tiles of 64 rows or more, else 4) and threads per tile; each thread
// has 8 weight rows (columns of y).
template <int BM>
constexpr int gemm_rows_per_thread() {
  return BM >= 64 ? 8 : 4;
}
template <int BM>
constexpr int gemm_threads() {
  return (BM / gemm_rows_per_thread<BM>()) * (kBN / 8);
}
// Blocks an SM should hold (the register budget: at most 65536 / (threads * this) a thread).
template <int BM>
constexpr int gemm_min_blocks() {
  return BM == 128 ? 2 : (BM == 64 ? 3 : 4);
}

// A step's tile data held in registers between its global loads and its shared stores. A chunk is
// 4 consecutive k of one row; weights stay packed (VEC) until they are stored.
template <typename W, bool VEC, int A_CHUNKS, int B_CHUNKS>
struct GemmStage {
  static constexpr int B_WORDS = VEC ? int(sizeof(W)) : 4;  // VEC: 4 elements of sizeof(W) bytes
  float a[A_CHUNKS][4];
  uint32_t b[B_CHUNKS][B_WORDS];  // VEC: packed elements; else 4 floats as bits
};

// out[z][m, n] (row stride ldo, z = blockIdx.z at out + z * split_stride) = the sum over k in split
// z's range [z * k_split, min(K, (z + 1) * k_split)) of x[m, k] w[n, k]. VEC: K, ldx multiples of
// 4, x 16-byte aligned, w aligned to 4 elements. SCALED (block-scaled FP8, element-wise loads):
// w[n, k] times ws[n / 128, k / 128].
template <typename W, int BM, bool VEC, bool SCALED>
__global__ void __launch_bounds__(gemm_threads<BM>(), gemm_min_blocks<BM>())
    gemm_kernel(const float* x, int64_t ldx, int T, int64_t K, const W* __restrict__ w,
                const float* __restrict__ ws, int64_t N, float* __restrict__ out, int64_t ldo, int64_t k_split,
                int64_t split_stride, bool vec_out) {
  wait_for_prior_kernels();
  static_assert(!(SCALED && VEC), "block-scaled weights are read element by element");
  constexpr int TMR = gemm_rows_per_thread<BM>();
  constexpr int NT = gemm_threads<BM>();
  constexpr int TX = kBN / 8;               // threads along n
  constexpr int CPR = kBK / 4;              // chunks per row of a step
  constexpr int A_CHUNKS = BM * CPR / NT;   // x chunks per thread per step
  constexpr int B_CHUNKS = kBN * CPR / NT;  // weight chunks per thread per step
  constexpr int ROWS_PER_PASS = NT / CPR;   // rows the block's threads cover in one chunk pass
  static_assert(A_CHUNKS >= 1 && B_CHUNKS >= 1 && BM * CPR % NT == 0 && kBN * CPR % NT == 0 && NT % CPR == 0);
  static_assert(TMR % 4 == 0);
  using Stage = GemmStage<W, VEC, A_CHUNKS, B_CHUNKS>;

  __shared__ __align__(16) float As[2][kBK][BM + kPad];
  __shared__ __align__(16) float Bs[2][kBK][kBN + kPad];

  const int tid = int(threadIdx.x), tx = tid % TX, ty = tid / TX;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * kBN;
  const int64_t kbeg = int64_t(blockIdx.z) * k_split;
  const int64_t kend = K < kbeg + k_split ? K : kbeg + k_split;
  out += int64_t(blockIdx.z) * split_stride;

  // This thread's chunks: rows lrow + i * ROWS_PER_PASS of the tile, k offset kq.
  const int lrow = tid / CPR, kq = (tid % CPR) * 4;
  const float* xb = x + (m0 + lrow) * ldx + kq;  // dereferenced only for rows < T
  const W* wb = w + (n0 + lrow) * K + kq;        // only for rows < N

  auto load = [&](int64_t k, Stage& s) {
    const int64_t kc = k + kq;
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      const bool row_ok = m0 + lrow + int64_t(i) * ROWS_PER_PASS < T;
      const float* p = xb + int64_t(i) * ROWS_PER_PASS * ldx + k;
      if constexpr (VEC) {
        if (row_ok && kc < kend) {  // VEC: kend is a multiple of 4, so the chunk is all in or out
          const float4 v = load4_after_wait(p);
          s.a[i][0] = v.x, s.a[i][1] = v.y, s.a[i][2] = v.z, s.a[i][3] = v.w;
        } else {
          s.a[i][0] = s.a[i][1] = s.a[i][2] = s.a[i][3] = 0.0f;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) s.a[i][j] = row_ok && kc + j < kend ? load_after_wait(p + j) : 0.0f;
      }
    }
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      const bool row_ok = n0 + lrow + int64_t(i) * ROWS_PER_PASS < N;
      const W* p = wb + int64_t(i) * ROWS_PER_PASS * K + k;
      if constexpr (VEC) {
        if (row_ok && kc < kend) {
          const Words<Stage::B_WORDS> v = load_words<Stage::B_WORDS>(p);
#pragma unroll
          for (int j = 0; j < Stage::B_WORDS; ++j) s.b[i][j] = v.w[j];
        } else {
#pragma unroll
          for (int j = 0; j < Stage::B_WORDS; ++j) s.b[i][j] = 0u;  // zero bits are 0.0 in every dtype
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float v = row_ok && kc + j < kend ? to_float(p[j]) : 0.0f;
          if constexpr (SCALED)
            if (row_ok && kc + j < kend)
              v *= __ldg(ws + ((n0 + lrow + int64_t(i) * ROWS_PER_PASS) / kScaleBlock) * cdiv(K, int64_t(kScaleBlock)) +
                         (kc + j) / kScaleBlock);
          s.b[i][j] = __float_as_uint(v);
        }
      }
    }
  };
  auto store = [&](int buf, const Stage& s) {
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) As[buf][kq + j][lrow + i * ROWS_PER_PASS] = s.a[i][j];
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      float b[4];
      if constexpr (VEC) {
        Words<Stage::B_WORDS> v;
#pragma unroll
        for (int j = 0; j < Stage::B_WORDS; ++j) v.w[j] = s.b[i][j];
        unpack_words<W, Stage::B_WORDS>(v, b);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = __uint_as_float(s.b[i][j]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) Bs[buf][kq + j][lrow + i * ROWS_PER_PASS] = b[j];
    }
  };

  float acc[TMR][8];
#pragma unroll
  for (int i = 0; i < TMR; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  Stage stage;
  if (kbeg < kend) {
    load(kbeg, stage);
    store(0, stage);
  }
  __syncthreads();
  int buf = 0;
  for (int64_t k = kbeg; k < kend; k += kBK) {
    const bool more = k + kBK < kend;
    if (more) load(k + kBK, stage);  // in flight while this step is multiplied
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[TMR], b[8];
#pragma unroll
      for (int g = 0; g < TMR / 4; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(&As[buf][kk][g * (BM / (TMR / 4)) + ty * 4]);
        a[4 * g] = v.x, a[4 * g + 1] = v.y, a[4 * g + 2] = v.z, a[4 * g + 3] = v.w;
      }
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(&Bs[buf][kk][g * (kBN / 2) + tx * 4]);
        b[4 * g] = v.x, b[4 * g + 1] = v.y, b[4 * g + 2] = v.z, b[4 * g + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TMR; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    if (more) store(buf ^ 1, stage);  // the other buffer: its last readers passed the barrier below
    __syncthreads();
    buf ^= 1;
  }

  // Rows g * BM / (TMR / 4) + ty * 4 + i, columns h * kBN / 2 + tx * 4 + j.
#pragma unroll
  for (int i = 0; i < TMR; ++i) {
    const int64_t m = m0 + (i / 4) * (BM / (TMR / 4)) + ty * 4 + (i % 4);
    if (m >= T) continue;
    float* orow = out + m * ldo;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + h * (kBN / 2) + tx * 4;
      const float* v = &acc[i][h * 4];
      if (vec_out && n + 4 <= N) {
        *reinterpret_cast<float4*>(orow + n) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (n + j < N) orow[n + j] = v[j];
      }
    }
  }
}

// y[m, n] = the sum over z < splits of partial[z][m, n] (partial [splits, T, N]), in order of z.
__global__ void sum_splits_kernel(const float* partial, int splits, int64_t T, int64_t N,
                                  float* __restrict__ y, int64_t ldy) {
  wait_for_prior_kernels();
  const int64_t total = T * N, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    float s = partial[i];
    for (int z = 1; z < splits; ++z) s += partial[z * total + i];
    y[(i / N) * ldy + i % N] = s;
  }
}

template <typename W, int BM>
void launch_gemm_tiles(const float* x, int64_t ldx, int T, int64_t K, const W* w, const float* ws, int64_t N,
                       float* out, int64_t ldo, int64_t k_split, int splits, int64_t split_stride, cudaStream_t stream) {
  const bool vec = K % 4 == 0 && ldx % 4 == 0 && aligned(x, 16) && aligned(w, 4 * sizeof(W));
  const bool vec_out = ldo % 4 == 0 && aligned(out, 16);
  const int64_t gx = cdiv(N, kBN), gy = cdiv(T, BM);
  check(gx <= 2147483647 && gy <= 65535, "matmul: {} x {} output is too large for one launch", T, N);
  const dim3 grid{unsigned(gx), unsigned(gy), unsigned(splits)};
  constexpr int NT = gemm_threads<BM>();
  if (ws)
    launch(gemm_kernel<W, BM, false, true>, grid, NT, 0, stream, x, ldx, T, K, w, ws, N, out, ldo, k_split,
           split_stride, vec_out);
  else if (vec)
    launch(gemm_kernel<W, BM, true, false>, grid, NT, 0, stream, x, ldx, T, K, w, ws, N, out, ldo, k_split,
           split_stride, vec_out);
  else
    launch(gemm_kernel<W, BM, false, false>, grid, NT, 0, stream, x, ldx, T, K, w, ws, N, out, ldo, k_split,
           split_stride, vec_out);
}

// How a product of many rows is tiled: the tile height that wastes least on few rows (128 only
// where there are tiles enough), and K split into `splits` parts of k_split (a multiple of kBK,
// each at least 256 deep) when the tiles are too few to fill the GPU.
struct GemmPlan {
  int bm = 128;
  int64_t splits = 1, k_split = 0;
};

GemmPlan plan_gemm(int64_t T, int64_t K, int64_t N, int sms) {
  GemmPlan p;
  p.bm = T <= 32 ? 32 : (T <= 64 ? 64 : 128);
  const int64_t col_tiles = cdiv(N, kBN);
  if (p.bm == 128 && cdiv(T, 128) * col_tiles < sms) p.bm = 64;
  const int64_t tiles = cdiv(T, p.bm) * col_tiles;
  if (tiles < sms) p.splits = std::min<int64_t>({cdiv(2 * int64_t(sms), tiles), std::max<int64_t>(1, K / 256), 16});
  p.k_split = cdiv(cdiv(K, p.splits), kBK) * kBK;
  p.splits = cdiv(K, p.k_split);
  return p;
}

template <typename W>
void launch_gemm(const float* x, int64_t ldx, int T, int64_t K, const W* w, const float* ws, int64_t N, float* y,
                 int64_t ldy, int sms, float* scratch, cudaStream_t stream) {
  GemmPlan p = plan_gemm(T, K, N, sms);
  if (!scratch) p = GemmPlan{p.bm, 1, K};
  float* out = y;
  int64_t ldo = ldy, split_stride = 0;
  if (p.splits > 1) {  // partial sums [splits, T, N] in scratch, then summed into y
    out = scratch;
    ldo = N;
    split_stride = int64_t(T) * N;
  }
  const int splits = int(p.splits);
  switch (p.bm) {
    case 32: launch_gemm_tiles<W, 32>(x, ldx, T, K, w, ws, N, out, ldo, p.k_split, splits, split_stride, stream); break;
    case 64: launch_gemm_tiles<W, 64>(x, ldx, T, K, w, ws, N, out, ldo, p.k_split, splits, split_stride, stream); break;
    default: launch_gemm_tiles<W, 128>(x, ldx, T, K, w, ws, N, out, ldo, p.k_split, splits, split_stride, stream); break;
  }
  if (splits > 1) {
    check_launch("matmul");
    launch(sum_splits_kernel, cuda::blocks_for(int64_t(T) * N, 256), 256, 0, stream, out, splits, T, N, y, ldy);
  }
}

// ws: the block scales of F8_E4M3_B128 weights (W = f8e4m3), else null.
template <typename W>
void matmul_typed(const float* x, int64_t ldx, int64_t T, int64_t K, const void* w, const float* ws, int64_t N,
                  float* y, int64_t ldy, int sms, float* scratch, cudaStream_t stream) {
  const W* wt = static_cast<const W*>(w);
  const FewRowsTargets one{{{w, N, y, ldy, 0, ws, false}}, 1};
  if (T > kFewRowsMax) launch_gemm<W>(x, ldx, int(T), K, wt, ws, N, y, ldy, sms, scratch, stream);
  else if constexpr (std::is_same_v<W, f8e4m3>)
    ws ? launch_few_rows<W, true>(x, ldx, int(T), K, one, stream) : launch_few_rows<W>(x, ldx, int(T), K, one, stream);
  else launch_few_rows<W>(x, ldx, int(T), K, one, stream);
}

// out[n, k] = bf16(w[n, k] * ws[n / 128, k / 128]), 8 elements a thread (K % 8 == 0: the 8 lie
// in one 128-block of k).
__global__ void dequantize_b128_kernel(const f8e4m3* __restrict__ w, const float* __restrict__ ws, int64_t N,
                                       int64_t K, __nv_bfloat16* __restrict__ out) {
  wait_for_prior_kernels();
  const int64_t chunks = N * K / 8, ldw = cdiv(K, int64_t(kScaleBlock));
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = c * 8 / K, k = c * 8 % K;
    float f[8];
    unpack_words<f8e4m3, 2>(load_words<2>(w + c * 8), f);
    const float sc = __ldg(ws + (n / kScaleBlock) * ldw + k / kScaleBlock);
    uint4 o;
    uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 b = __floats2bfloat162_rn(f[2 * i] * sc, f[2 * i + 1] * sc);
      ow[i] = *reinterpret_cast<const uint32_t*>(&b);
    }
    reinterpret_cast<uint4*>(out)[c] = o;
  }
}

// ---- Block-scaled FP8 products on the FP8 tensor cores (cuBLASLt, Hopper) ----
// What vLLM and SGLang compute for Qwen's FP8 releases: x quantized per row and 128 consecutive k
// (scale = amax / 448, nearest e4m3), the weights' own 128 x 128 scales, fp32 accumulation. In
// cuBLASLt's column-major terms y^T [N, Tp] = w (A: [K, N], transposed, BLK128x128 scales, which
// are the checkpoint's [N/128][K/128] when K/128 is a multiple of 4) times xq (B: [K, Tp],
// VEC128 scales laid out [K/128][Tp]); Tp: T rounded up to 16 (rows past T are zeros).
constexpr int64_t kLtRowsAlign = 16;
constexpr size_t kLtWorkspace = size_t(32) << 20;

// xq [Tp, K] e4m3 and xs [K/128, Tp]: one warp per (row, block); rows t >= T are zeros, scale 1.
// With up (not null): silu(x) * up quantized, the floats silu_mul writes.
__global__ void quantize_rows_b128_kernel(const float* x, int64_t T, int64_t Tp, int64_t K,
                                          __nv_fp8_storage_t* __restrict__ xq, float* __restrict__ xs,
                                          const float* up) {
  wait_for_prior_kernels();
  const int lane = int(threadIdx.x) & 31;
  const int64_t L = K / kScaleBlock, items = Tp * L;
  for (int64_t it = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; it < items;
       it += int64_t(gridDim.x) * blockDim.x / 32) {
    const int64_t t = it / L, b = it % L, k = b * kScaleBlock + lane * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (t < T) v = load4_after_wait(x + t * K + k);
    if (up != nullptr && t < T) {
      const float4 u = load4_after_wait(up + t * K + k);
      v = make_float4(silu_(v.x) * u.x, silu_(v.y) * u.y, silu_(v.z) * u.z, silu_(v.w) * u.w);
    }
    float sc;
    *reinterpret_cast<uint32_t*>(xq + t * K + k) = quantize_b128(v, sc);
    if (lane == 0) xs[b * Tp + t] = sc;
  }
}

struct LtPlan {
  bool ok = false;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

struct MatmulState {
  cublasLtHandle_t lt = nullptr;
  void* lt_workspace = nullptr;
  std::map<std::tuple<int64_t, int64_t, int64_t>, LtPlan> plans;  // by (Tp, K, N)
  MatmulState() = default;
  MatmulState(const MatmulState&) = delete;
  MatmulState& operator=(const MatmulState&) = delete;
  ~MatmulState() {
    for (auto& [key, p] : plans) {
      if (p.desc) cublasLtMatmulDescDestroy(p.desc);
      for (cublasLtMatrixLayout_t l : {p.a, p.b, p.d})
        if (l) cublasLtMatrixLayoutDestroy(l);
    }
    if (lt_workspace) cudaFree(lt_workspace);
    if (lt) cublasLtDestroy(lt);
  }

  // The plan of a (Tp, K, N) product, made at its first call (never while a graph is captured:
  // the first pass of a shape runs eagerly); ok = false where cuBLASLt has no kernel for it. The
  // heuristic wants the scale pointers set (it finds nothing for null ones): the call's.
  const LtPlan& plan(int64_t Tp, int64_t K, int64_t N, const float* ws, const float* xs, Counters& counters) {
    const auto key = std::make_tuple(Tp, K, N);
    if (auto it = plans.find(key); it != plans.end()) return it->second;
    LtPlan& p = plans[key];
    if (!lt) {
      check(cublasLtCreate(&lt) == CUBLAS_STATUS_SUCCESS, "matmul: cublasLtCreate failed");
      lt_workspace = cuda::device_malloc(kLtWorkspace, "matmul: cuBLASLt workspace");
      ++counters.allocations;
      counters.bytes_allocated += int64_t(kLtWorkspace);
    }
    auto ok = [](cublasStatus_t st) { return st == CUBLAS_STATUS_SUCCESS; };
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const cublasLtMatmulMatrixScale_t sa = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
                                      sb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    bool good = ok(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)) &&
                ok(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta))) &&
                ok(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb))) &&
                ok(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &sa, sizeof(sa))) &&
                ok(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &sb, sizeof(sb))) &&
                ok(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof(ws))) &&
                ok(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs, sizeof(xs))) &&
                ok(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(N), K)) &&
                ok(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(Tp), K)) &&
                ok(cublasLtMatrixLayoutCreate(&p.d, CUDA_R_32F, uint64_t(N), uint64_t(Tp), N));
    cublasLtMatmulPreference_t pref = nullptr;
    if (good && ok(cublasLtMatmulPreferenceCreate(&pref))) {
      const size_t ws = kLtWorkspace;
      cublasLtMatmulHeuristicResult_t r{};
      int found = 0;
      good = ok(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws))) &&
             ok(cublasLtMatmulAlgoGetHeuristic(lt, p.desc, p.a, p.b, p.d, p.d, pref, 1, &r, &found)) && found > 0;
      if (good) p.algo = r.algo;
      cublasLtMatmulPreferenceDestroy(pref);
    }
    p.ok = good;
    return p;
  }
};

// The state of the matmul ops (CudaOps::matmul_state_), made at first need.
MatmulState& matmul_state_of(std::shared_ptr<void>& state) {
  if (!state) {
    state = std::make_shared<MatmulState>();
  }
  return *static_cast<MatmulState*>(state.get());
}

// Whether a block-scaled FP8 product of T rows can take the FP8 tensor cores: whole 128-blocks of
// k in groups of 4 (the weight scales' layout as stored), rows of N 16-byte aligned.
bool fp8_tensor_cores_fit(int64_t T, int64_t K, int64_t N, const void* x) {
  return T > kFewRowsMax && K % (4 * kScaleBlock) == 0 && N % 16 == 0 && aligned(x, 16) && T < (int64_t(1) << 30) &&
         K < (int64_t(1) << 31) && N < (int64_t(1) << 31);
}

// The scratch of lt_fp8_matmul: xq [Tp, K] e4m3, xs [K/128, Tp] fp32, and the output's Tp rows
// where Tp > T; each part 256-byte aligned.
struct Fp8Scratch {
  int64_t Tp;
  size_t xq, xs, d;  // bytes of each part
  explicit Fp8Scratch(int64_t T, int64_t K, int64_t N) : Tp(cdiv(T, kLtRowsAlign) * kLtRowsAlign) {
    auto round = [](size_t n) { return (n + 255) / 256 * 256; };
    xq = round(size_t(Tp * K));
    xs = round(size_t(Tp * (K / kScaleBlock)) * 4);
    d = Tp == T ? 0 : size_t(Tp * N) * 4;
  }
  size_t bytes() const { return xq + xs + d; }
};

// y [T, N] = x @ w^T as above; scratch holds Fp8Scratch(T, K, N).bytes(), and with `quantized`
// already x's FP8 rows and scales (a product of the same x before). False (nothing queued) where
// cuBLASLt has no kernel for the shape.
bool lt_fp8_matmul(MatmulState& st, Counters& counters, const float* x, int64_t T, int64_t K, const void* w,
                   const float* ws, int64_t N, float* y, void* scratch, bool quantized, cudaStream_t stream) {
  const Fp8Scratch sz(T, K, N);
  const int64_t Tp = sz.Tp;
  char* base = static_cast<char*>(scratch);
  auto* xq = reinterpret_cast<__nv_fp8_storage_t*>(base);
  float* xs = reinterpret_cast<float*>(base + sz.xq);
  float* d = Tp == T ? y : reinterpret_cast<float*>(base + sz.xq + sz.xs);
  const LtPlan& p = st.plan(Tp, K, N, ws, xs, counters);
  if (!p.ok) return false;
  if (!quantized) {
    quantize_rows_b128(x, T, Tp, K, reinterpret_cast<uint8_t*>(xq), xs, stream);
    check_launch("matmul: quantizing x to FP8");
  }
  check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof(ws)) ==
                CUBLAS_STATUS_SUCCESS &&
            cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs, sizeof(xs)) ==
                CUBLAS_STATUS_SUCCESS,
        "matmul: cuBLASLt scale pointers");
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t r = cublasLtMatmul(st.lt, p.desc, &alpha, w, p.a, xq, p.b, &beta, d, p.d, d, p.d, &p.algo,
                                          st.lt_workspace, kLtWorkspace, stream);
  check(r == CUBLAS_STATUS_SUCCESS, "matmul: cublasLtMatmul (FP8, block scales) failed ({}) for T={} K={} N={}",
        cublasGetStatusString(r), T, K, N);
  if (d != y)
    check_cuda(cudaMemcpyAsync(y, d, size_t(T * N) * 4, cudaMemcpyDeviceToDevice, stream), "matmul: FP8 rows");
  return true;
}

// y[T, N] = x[T, K] @ w[N, K]^T on the tensor cores; xh: room for T * K 16-bit values (and, for
// block-scaled FP8 weights, N * K more: the weights dequantized to bf16 there, then multiplied as
// bf16 ones: rounding each weight to bf16 costs what rounding x does, 2^-9 relative); with
// `rounded`, xh holds x rounded already (to bf16 for BF16 and FP8 weights, f16 for F16 ones).
void cublas_matmul(cublasHandle_t handle, const float* x, int64_t T, int64_t K, const void* w, DType wdt,
                   const float* ws, int64_t N, float* y, void* xh, bool rounded, cudaStream_t stream) {
  if (wdt == DType::F8_E4M3_B128) {
    __nv_bfloat16* wb = static_cast<__nv_bfloat16*>(xh) + T * K;
    const int64_t chunks = N * K / 8;
    launch(dequantize_b128_kernel, unsigned(std::min<int64_t>(cdiv(chunks, 256), 8192)), 256, 0, stream,
           static_cast<const f8e4m3*>(w), ws, N, K, wb);
    check_launch("matmul: dequantizing FP8 weights");
    w = wb;
    wdt = DType::BF16;
  }
  const bool bf16 = wdt == DType::BF16;
  if (!rounded) {
    if (bf16) round_to_16bit(x, static_cast<__nv_bfloat16*>(xh), T * K, stream);
    else round_to_16bit(x, static_cast<__half*>(xh), T * K, stream);
    check_launch("matmul: rounding x");
  }
  // Column-major view: y^T [N, T] = (w [N, K] row-major = col-major [K, N])^T @ x^T [K, T].
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType_t t = bf16 ? CUDA_R_16BF : CUDA_R_16F;
  const cublasStatus_t st =
      cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(T), int(K), &alpha, w, t, int(K), xh, t, int(K), &beta,
                   y, CUDA_R_32F, int(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  check(st == CUBLAS_STATUS_SUCCESS, "matmul: cublasGemmEx failed ({}) for T={} K={} N={}", cublasGetStatusString(st),
        T, K, N);
}

// Whether the many-rows product goes to cuBLAS: 16-bit or block-scaled FP8 weights (the latter
// dequantized to bf16 first), int-sized dims, x aligned for the float4 rounding.
bool cublas_fits(int64_t T, int64_t K, int64_t N, DType wdt, const void* x) {
  return (wdt == DType::BF16 || wdt == DType::F16 || wdt == DType::F8_E4M3_B128) && T > kFewRowsMax && K % 8 == 0 &&
         T < (int64_t(1) << 31) && K < (int64_t(1) << 31) && N < (int64_t(1) << 31) && aligned(x, 16);
}


}  // namespace

namespace cuda::rows {

void quantize_rows_b128(const float* x, int64_t T, int64_t Tp, int64_t K, uint8_t* xq, float* xs,
                        cudaStream_t stream, const float* up) {
  const int64_t warps = Tp * (K / kScaleBlock);
  launch(quantize_rows_b128_kernel, unsigned(std::min<int64_t>(cdiv(warps, 8), 65535)), 256, 0, stream, x, T, Tp, K,
         reinterpret_cast<__nv_fp8_storage_t*>(xq), xs, up);
}

size_t matmul_scratch_bytes(int64_t T, int64_t K, int64_t N, int sms) {
  if (T <= kFewRowsMax || K <= 0 || N <= 0) return 0;
  const GemmPlan p = plan_gemm(T, K, N, sms);
  return p.splits > 1 ? size_t(p.splits) * size_t(T) * size_t(N) * sizeof(float) : 0;
}

void matmul_rows(const float* x, int64_t ldx, int64_t T, int64_t K, const void* w, DType wdt, const float* ws,
                 int64_t N, float* y, int64_t ldy, int sms, float* scratch, cudaStream_t stream) {
  check(T >= 0 && K >= 0 && N >= 0 && ldx >= K && ldy >= N, "matmul: bad shape T={} K={} N={} ldx={} ldy={}", T, K, N,
        ldx, ldy);
  check(T <= 2147483647, "matmul: {} rows are too many", T);
  if (T == 0 || N == 0) return;
  if (K == 0) {  // an empty sum
    check_cuda(cudaMemset2DAsync(y, size_t(ldy) * sizeof(float), 0, size_t(N) * sizeof(float), size_t(T), stream),
               "matmul: cudaMemset2DAsync");
    return;
  }
  switch (wdt) {
    case DType::F32: matmul_typed<float>(x, ldx, T, K, w, nullptr, N, y, ldy, sms, scratch, stream); break;
    case DType::BF16: matmul_typed<__nv_bfloat16>(x, ldx, T, K, w, nullptr, N, y, ldy, sms, scratch, stream); break;
    case DType::F16: matmul_typed<__half>(x, ldx, T, K, w, nullptr, N, y, ldy, sms, scratch, stream); break;
    case DType::F8_E4M3: matmul_typed<f8e4m3>(x, ldx, T, K, w, nullptr, N, y, ldy, sms, scratch, stream); break;
    case DType::F8_E4M3_B128:
      check(ws != nullptr, "matmul: F8_E4M3_B128 weights without their block scales");
      matmul_typed<f8e4m3>(x, ldx, T, K, w, ws, N, y, ldy, sms, scratch, stream);
      break;
    default: fail("matmul: weight dtype {} is not F32, BF16, F16, F8_E4M3 or F8_E4M3_B128", dtype_name(wdt));
  }
  check_launch("matmul");
}

}  // namespace cuda::rows

void CudaOps::matmul(const Tensor& x, const Tensor& w, Tensor& y) { matmul_with(x, w, y, XForm::none); }

CudaOps::XForm CudaOps::matmul_with(const Tensor& x, const Tensor& w, Tensor& y, XForm ready) {
  auto timed = time_op("matmul");
  const auto [T, K, N] = check_matmul(x, w, y);
  expect_device("matmul", "x", x);
  expect_device("matmul", "y", y);
  expect_device("matmul", "w", w);
  const bool scaled = w.dtype() == DType::F8_E4M3_B128;
  const float* ws = scaled ? cuda::f32(w.scales()) : nullptr;
  if (scaled) expect_device("matmul", "w's block scales", w.scales());
  if (T == 0 || N == 0) return ready;
  MatmulState& st = matmul_state_of(matmul_state_);
  const int sms = device_.sms;
  const FewRowsTargets one{{{w.raw(), N, cuda::f32_mut(y), N, 0, ws, false}}, 1};
  const bool rows_mma = bf16_matmul_ && mma_rows_take(device_, w, T, K, N, x.raw());
  if (rows_mma && scaled) {
    timed.op = "matmul gemv (FP8 tensor cores)";
    launch_mma_rows(cuda::f32(x), int(T), K, one, {}, scratch_->bytes(fp8_rows_scratch(T, K)), stream_);
    check_launch("matmul");
    return XForm::none;
  }
  if (rows_mma) {
    timed.op = "matmul gemv (bf16 tensor cores)";
    launch_mma_rows(cuda::f32(x), int(T), K, {}, one, nullptr, stream_);
    check_launch("matmul");
    return ready;
  }
  if (bf16_matmul_ && scaled && fp8_tensor_cores_fit(T, K, N, x.raw())) {
    timed.op = "matmul gemm (FP8 tensor cores, cuBLASLt)";
    library_call();
    const size_t need = Fp8Scratch(T, K, N).bytes();
    const bool quantized = ready == XForm::fp8 && need <= scratch_->size();
    if (lt_fp8_matmul(st, counters_, cuda::f32(x), T, K, w.raw(), ws, N, cuda::f32_mut(y), scratch_->bytes(need),
                      quantized, stream_))
      return XForm::fp8;
  }
  if (bf16_matmul_ && cublas_fits(T, K, N, w.dtype(), x.raw())) {
    timed.op = scaled ? "matmul gemm (FP8 weights as bf16, cuBLAS)" : "matmul gemm (cuBLAS bf16)";
    const XForm form = w.dtype() == DType::F16 ? XForm::f16 : XForm::bf16;
    const size_t need = size_t(T * K + (scaled ? N * K : 0)) * 2;
    const bool rounded = ready == form && need <= scratch_->size();
    cublas_matmul(library_call(), cuda::f32(x), T, K, w.raw(), w.dtype(), ws, N, cuda::f32_mut(y),
                  scratch_->bytes(need), rounded, stream_);
    return form;
  }
  timed.op = T <= kFewRowsMax ? "matmul gemv" : "matmul gemm (fp32)";
  const size_t bytes = matmul_scratch_bytes(T, K, N, sms);
  float* scratch = bytes > 0 ? static_cast<float*>(scratch_->bytes(bytes)) : nullptr;
  matmul_rows(cuda::f32(x), K, T, K, w.raw(), w.dtype(), ws, N, cuda::f32_mut(y), N, sms, scratch, stream_);
  return scratch ? XForm::none : ready;
}

// Few rows of F32, BF16 or block-scaled FP8 weights: the few-row product applies the row gate as it
// stores, and with one or two rows also forms silu(gate) * up as it loads them (decode: two
// elementwise kernels fewer a layer). From three rows silu_mul runs first: every warp of the
// product (4 weight rows) would form all T x K values itself, and at 8 rows the fused product of a
// 1 MB FP8 down weight took ~25 us in the graph (80B FP8, batch 8: +5% with silu_mul apart;
// docs/perf.md). Otherwise silu_mul, matmul and scale_rows_sigmoid.
void CudaOps::swiglu_down(Tensor& gate, const Tensor& up, const Tensor& w, const Tensor& row_gate, Tensor& out) {
  const auto [T, K, N] = check_swiglu_down(gate, up, w, row_gate, out);
  const DType wdt = w.dtype();
  const bool shaped = T >= 1 && K > 0 && N > 0;
  const bool few = shaped && T <= kFewRowsMax && (wdt == DType::F32 || wdt == DType::BF16 || wdt == DType::F8_E4M3_B128);
  const bool fused = few && T <= kSwigluFusedRowsMax;
  const bool scaled = wdt == DType::F8_E4M3_B128;
  // 3 - 32 rows of block-scaled FP8 or bf16 (mma_rows_take) on the tensor cores: silu(gate) * up
  // formed as x is quantized (FP8) or loaded (bf16).
  const bool mma = shaped && !fused && bf16_matmul_ && aligned(up.raw(), 16) &&
                   mma_rows_take(device_, w, T, K, N, gate.raw());
  const bool f8_mma = mma && scaled, b16_mma = mma && !scaled;
  if (!few && !f8_mma && !b16_mma) {
    silu_mul(gate, up, gate);
    matmul(gate, w, out);
    if (row_gate.defined()) scale_rows_sigmoid(out, row_gate);
    return;
  }
  if (!fused && !f8_mma && !b16_mma) silu_mul(gate, up, gate);
  auto timed = time_op(fused    ? "swiglu_down gemv"
                       : f8_mma  ? "swiglu_down gemv (FP8 tensor cores)"
                       : b16_mma ? "swiglu_down gemv (bf16 tensor cores)"
                                 : "matmul gemv");
  expect_device("swiglu_down", "gate", gate);
  expect_device("swiglu_down", "up", up);
  expect_device("swiglu_down", "w", w);
  expect_device("swiglu_down", "out", out);
  if (row_gate.defined()) expect_device("swiglu_down", "row_gate", row_gate);
  if (scaled) expect_device("swiglu_down", "w's block scales", w.scales());
  const FewRowsTarget target{w.raw(), N, cuda::f32_mut(out), N, 0, scaled ? cuda::f32(w.scales()) : nullptr, false};
  const float* g = cuda::f32(gate);
  const float* u = cuda::f32(up);
  const float* rg = row_gate.defined() ? cuda::f32(row_gate) : nullptr;
  const FewRowsTargets one{{target}, 1};
  if (f8_mma || b16_mma) {
    if (f8_mma) launch_mma_rows(g, int(T), K, one, {}, scratch_->bytes(fp8_rows_scratch(T, K)), stream_, u, rg);
    else launch_mma_rows(g, int(T), K, {}, one, nullptr, stream_, u, rg);
    check_launch("swiglu_down");
    return;
  }
  const auto run = [&](auto mode) {
    constexpr XIn MODE = decltype(mode)::value;
    const float* uu = MODE == XIn::swiglu ? u : nullptr;
    if (wdt == DType::F32) launch_few_rows<float, false, float, false, MODE>(g, K, int(T), K, one, stream_, uu, rg);
    else if (wdt == DType::BF16)
      launch_few_rows<__nv_bfloat16, false, __nv_bfloat16, false, MODE>(g, K, int(T), K, one, stream_, uu, rg);
    else launch_few_rows<f8e4m3, true, f8e4m3, true, MODE>(g, K, int(T), K, one, stream_, uu, rg);
  };
  if (fused) run(std::integral_constant<XIn, XIn::swiglu>{});
  else run(std::integral_constant<XIn, XIn::plain>{});
  check_launch("swiglu_down");
}

void CudaOps::matmul_many(const Tensor& x, std::span<const Tensor> w, std::span<Tensor> y) {
  check_matmul_many(w, y);
  matmul_many_with(x, w, y, nullptr);
}

namespace {
// Whether products of one row x of D take the second half of a split norm (XIn::norm_scaled): one
// CUDA-core launch (whole vector steps of every weight dtype: 16).
bool norm_scaled_fits(int64_t rows, int64_t D, const Tensor& x, std::span<const Tensor> wy) {
  bool same = true;
  bool fits = rows == 1 && D % 16 == 0 && !wy.empty() && wy.size() <= size_t(kFewTargetsMax) &&
              few_rows_dtypes_share(wy, same) && aligned(x.raw(), 16);
  for (const Tensor& t : wy) fits = fits && aligned(t.raw(), 16);
  return fits;
}

// h = s * the row's RMS factor from `parts` partial sums of squares a row (matmul_many_normed where
// the products cannot finish the norm): a block a row, the factor as the products compute it.
__global__ void __launch_bounds__(kFewThreads) norm_finish_kernel(const float* s, const float* sums, int64_t ld,
                                                                  int parts, float eps, float* h, int64_t D) {
  wait_for_prior_kernels();
  const int64_t r = blockIdx.x;
  const int lane = int(threadIdx.x) & 31;
  float p = 0.0f;  // every warp the same sum, in the products' order (norm_partials_of_lane, norm_factor)
  for (int i = lane; i < parts; i += 32) p += load_after_wait(sums + r * ld + i);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) p += __shfl_xor_sync(0xffffffffu, p, off);
  const float factor = 1.0f / sqrtf(p / float(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += kFewThreads) h[r * D + i] = load_after_wait(s + r * D + i) * factor;
}
}  // namespace

// A pending norm (one row, from matmul_add_norm or moe_routed_add_norm) is finished by the products
// that read it: the norm is computed where its input is finished, not by a kernel of its own between
// them (80B FP8 batch 1: the norm kernel costs 3.4 us a call in the graph; moving its work into the
// next products' blocks lost 3.6-8.7%; the post-mixer norm split, +1.0% on an H100 over six A/B
// rounds, docs/perf.md session 40). Their warps add the partial sums (a few loads a lane, after
// their wait, beside their weights in flight), multiply each sum by the row's factor as they store
// it, and store h (where asked for) in turn, 128 elements a warp. Otherwise a norm_finish kernel,
// then matmul_many.
void CudaOps::matmul_many_normed(const PendingNorm& n, Tensor& h, std::span<const Tensor> w, std::span<Tensor> y) {
  const auto [T, D] = check_matmul_many_normed(n, h, w, y);
  if (n.parts == 0) {  // finished
    Ops::matmul_many_normed(n, h, w, y);
    return;
  }
  expect_device("matmul_many_normed", "s", n.s);
  expect_device("matmul_many_normed", "sums", n.sums);
  if (h.defined()) expect_device("matmul_many_normed", "h", h);
  ResidualNorm rn{nullptr, nullptr, DType::F32, cuda::f32_mut(n.sums), n.parts, n.eps,
                  h.defined() ? cuda::f32_mut(h) : nullptr};
  if (norm_scaled_fits(T, D, n.s, w) && (!h.defined() || aligned(h.raw(), 16))) {
    matmul_many_with(n.s, w, y, &rn);
    return;
  }
  Tensor rows = h.defined() ? h : n.s;  // (finished in place where no h is asked for)
  {
    auto timed = time_op("norm_finish");
    if (T > 0 && D > 0)
      launch(norm_finish_kernel, cuda::blocks_for(T, 1), kFewThreads, 0, stream_, cuda::f32(n.s), cuda::f32(n.sums),
             n.sums.dim(1), n.parts, n.eps, cuda::f32_mut(rows), D);
    check_launch("matmul_many_normed");
  }
  if (!w.empty()) matmul_many(rows, w, y);
}

int64_t CudaOps::norm_parts(int64_t H) const {
  // matmul_add_norm's one-row launch leaves a sum a block (a weight row or more a warp, 4 warps a
  // block: at most H / 4), moe_routed_add_norm one a slice of the row (8, cuda_moe.cu).
  return std::max<int64_t>(8, cdiv(H, kFewThreads / 32));
}

// One row (batch-1 decode) where the product is one CUDA-core launch: its warps add each sum into x
// as they store it, store it times (1 + w) into d and sum its square; each block stores its warps'
// sum (one order: the same bits every run). The products that read d finish the norm
// (matmul_many_normed). Otherwise matmul, then add_rms_norm.
PendingNorm CudaOps::matmul_add_norm(const Tensor& o, const Tensor& w_out, Tensor& d, const AddNorm& then) {
  const auto [R, D] = check_matmul_add_norm(o, w_out, d, then);
  const int64_t K = o.rank() == 2 ? o.dim(1) : 0;
  const DType dt = w_out.dtype();
  bool split = R == 1 && K % 16 == 0 && D % 16 == 0;  // whole vector steps of every weight dtype
  for (const Tensor* t : std::initializer_list<const Tensor*>{&o, &w_out, &then.x, &d})
    split = split && aligned(t->raw(), 16);
  if (!split) return Ops::matmul_add_norm(o, w_out, d, then);
  auto timed = time_op("matmul gemv (the residual add and norm's sums at its store)");
  check_matmul_add_norm(o, w_out, d, then, norm_parts(D));
  expect_device("matmul_add_norm", "o", o);
  expect_device("matmul_add_norm", "w_out", w_out);
  expect_device("matmul_add_norm", "x", then.x);
  expect_device("matmul_add_norm", "d", d);
  expect_device("matmul_add_norm", "w", then.w);
  expect_device("matmul_add_norm", "sums", then.sums);
  const bool scaled = dt == DType::F8_E4M3_B128;
  if (scaled) expect_device("matmul_add_norm", "w_out's block scales", w_out.scales());
  ResidualNorm rn{cuda::f32_mut(then.x), then.w.raw(), then.w.dtype(), cuda::f32_mut(then.sums), 0, then.eps, nullptr};
  const FewRowsTargets one{{{w_out.raw(), D, cuda::f32_mut(d), D, 0, scaled ? cuda::f32(w_out.scales()) : nullptr,
                             false}},
                           1};
  rn.count = launch_few_rows_of<XIn::norm_partials>(dt, true, cuda::f32(o), 1, K, one, stream_, rn);
  check_launch("matmul_add_norm");
  return {d, then.sums, int(rn.count), then.eps};
}

void CudaOps::matmul_many_with(const Tensor& x, std::span<const Tensor> w, std::span<Tensor> y,
                               const ResidualNorm* rn) {
  // One launch for the few-rows products of one weight dtype, or of block-scaled FP8 beside bf16
  // (an FP8 model's unquantized projections): to 8 rows on either few-row path, to 32 where every
  // target takes the tensor cores (mma_rows_take: an FP8 model's projections with its router,
  // DeltaNet a/b and shared expert gate in one launch); otherwise one matmul each.
  bool one = !w.empty() && w.size() <= size_t(kFewTargetsMax) && x.rank() == 2 && x.dim(0) <= kMmaRowsMax;
  bool same = true, mma = one && bf16_matmul_;
  for (size_t i = 0; one && i < w.size(); ++i) {
    const auto [T, K, N] = check_matmul(x, w[i], y[i]);
    mma = mma && mma_rows_take(device_, w[i], T, K, N, x.raw());
  }
  one = one && few_rows_dtypes_share(w, same) && (mma || x.dim(0) <= kFewRowsMax);
  check(!rn || (one && !mma), "matmul_many_normed: its products are not one launch");  // (checked)
  if (!one || x.dim(0) == 0 || x.dim(1) == 0) {
    // One product each. Products of many rows convert x for the tensor cores (quantized for
    // cuBLASLt, rounded for cuBLAS): the block-scaled FP8 targets first, then the others, so that
    // each form is made once (an FP8 model's DeltaNet and MoE projections are two of each). The
    // scratch is sized for the largest first, so that it does not move between them (a product
    // that would grow it converts x again).
    size_t most = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      const MatmulShape m = check_matmul(x, w[i], y[i]);
      const bool scaled = w[i].dtype() == DType::F8_E4M3_B128;
      most = std::max({most, m.T > kFewRowsMax ? Fp8Scratch(m.T, m.K, m.N).bytes() : 0,
                       size_t(m.T * m.K + (scaled ? m.N * m.K : 0)) * 2, fp8_rows_scratch(m.T, m.K),
                       matmul_scratch_bytes(m.T, m.K, m.N, device_.sms)});
    }
    if (most > 0) scratch_->bytes(most);
    XForm ready = XForm::none;
    for (const bool fp8 : {true, false})
      for (size_t i = 0; i < w.size(); ++i)
        if ((w[i].dtype() == DType::F8_E4M3_B128) == fp8) ready = matmul_with(x, w[i], y[i], ready);
    return;
  }
  auto timed = time_op(rn ? "matmul gemv (times the row's RMS factor)" : "matmul gemv");
  FewRowsTargets tg{};
  tg.count = int(w.size());
  int64_t T = 0, K = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    const MatmulShape shape = check_matmul(x, w[i], y[i]);
    T = shape.T, K = shape.K;
    expect_device("matmul", "w", w[i]);
    expect_device("matmul", "y", y[i]);
    const bool scaled = w[i].dtype() == DType::F8_E4M3_B128;
    if (scaled) expect_device("matmul", "w's block scales", w[i].scales());
    tg.t[i] = FewRowsTarget{w[i].raw(), shape.N, cuda::f32_mut(y[i]), shape.N, 0,
                            scaled ? cuda::f32(w[i].scales()) : nullptr, !same && w[i].dtype() == DType::BF16};
  }
  expect_device("matmul", "x", x);
  if (mma) {
    FewRowsTargets f8{}, b16{};
    for (int q = 0; q < tg.count; ++q) {
      FewRowsTargets& to = w[size_t(q)].dtype() == DType::F8_E4M3_B128 ? f8 : b16;
      to.t[to.count] = tg.t[q];
      to.t[to.count++].alt = false;
    }
    timed.op = "matmul gemv (tensor cores)";
    launch_mma_rows(cuda::f32(x), int(T), K, f8, b16, f8.count > 0 ? scratch_->bytes(fp8_rows_scratch(T, K)) : nullptr,
                    stream_);
    check_launch("matmul");
    return;
  }
  if (rn) launch_few_rows_of<XIn::norm_scaled>(w[0].dtype(), same, cuda::f32(x), int(T), K, tg, stream_, *rn);
  else launch_few_rows_of<XIn::plain>(w[0].dtype(), same, cuda::f32(x), int(T), K, tg, stream_);
  check_launch("matmul");
}

}  // namespace ballast::kernels
