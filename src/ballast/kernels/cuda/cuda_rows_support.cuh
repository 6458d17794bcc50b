#pragma once
// Helpers of the row ops and the matmul (internal to ballast_kernels_cuda): weights of every
// floating dtype (F32, BF16, F16, F8_E4M3) read as float, one element or a short vector at a time,
// and the raw-pointer matmul launcher (cuda_matmul.cu) that other groups of ops may call on rows
// that have no Tensor.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ballast/core/tensor.h"
#include "ballast/kernels/cuda/cuda_support.cuh"

namespace ballast::kernels::cuda::rows {

// Storage of an F8_E4M3 weight element (a tag type, so that templates tell it from int8).
struct f8e4m3 {
  uint8_t bits;
};

// --- one element as float ---
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
// E4M3 (no infinities; S.1111.111 is NaN) is exact in half precision, so through half is exact.
__device__ __forceinline__ float to_float(f8e4m3 v) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(v.bits), __NV_E4M3);
  return __half2float(__half(h));
}

// Element i of a weight of dtype dt (F32, BF16, F16 or F8_E4M3) as float.
__device__ __forceinline__ float load_weight(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::BF16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::F16: return to_float(static_cast<const __half*>(p)[i]);
    case DType::F8_E4M3: return to_float(static_cast<const f8e4m3*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// --- a 32-bit word of packed elements as floats (4 / sizeof(W) of them) ---
template <typename W>
__device__ __forceinline__ void unpack_word(uint32_t u, float* out);
template <>
__device__ __forceinline__ void unpack_word<float>(uint32_t u, float* out) {
  out[0] = __uint_as_float(u);
}
template <>
__device__ __forceinline__ void unpack_word<__nv_bfloat16>(uint32_t u, float* out) {
  out[0] = __uint_as_float(u << 16);  // little endian: the lower half is the first element
  out[1] = __uint_as_float(u & 0xffff0000u);
}
template <>
__device__ __forceinline__ void unpack_word<__half>(uint32_t u, float* out) {
  __half2_raw r;
  r.x = static_cast<unsigned short>(u & 0xffffu);
  r.y = static_cast<unsigned short>(u >> 16);
  const float2 f = __half22float2(__half2(r));
  out[0] = f.x;
  out[1] = f.y;
}
template <>
__device__ __forceinline__ void unpack_word<f8e4m3>(uint32_t u, float* out) {
  const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(u & 0xffffu), __NV_E4M3);
  const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(u >> 16), __NV_E4M3);
  const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
  out[0] = a.x;
  out[1] = a.y;
  out[2] = b.x;
  out[3] = b.y;
}

// WORDS 32-bit words loaded at once (4, 8 or 16 bytes: the pointer must be aligned to that).
template <int WORDS>
struct Words {
  uint32_t w[WORDS];
};
template <int WORDS>
__device__ __forceinline__ Words<WORDS> load_words(const void* p) {
  Words<WORDS> r;
  if constexpr (WORDS == 4) {
    const uint4 v = __ldg(static_cast<const uint4*>(p));
    r.w[0] = v.x, r.w[1] = v.y, r.w[2] = v.z, r.w[3] = v.w;
  } else if constexpr (WORDS == 2) {
    const uint2 v = __ldg(static_cast<const uint2*>(p));
    r.w[0] = v.x, r.w[1] = v.y;
  } else {
    static_assert(WORDS == 1, "load_words: 1, 2 or 4 words");
    r.w[0] = __ldg(static_cast<const unsigned int*>(p));
  }
  return r;
}
// The same for what the kernels before wrote (activations, caches), after wait_for_prior_kernels():
// coherent loads that stay below the wait (load4_after_wait's reasons, cuda_support.cuh).
template <int WORDS>
__device__ __forceinline__ Words<WORDS> load_words_after_wait(const void* p) {
  Words<WORDS> r;
  if constexpr (WORDS == 4) {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3]) : "l"(p));
  } else if constexpr (WORDS == 2) {
    asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(r.w[0]), "=r"(r.w[1]) : "l"(p));
  } else {
    static_assert(WORDS == 1, "load_words_after_wait: 1, 2 or 4 words");
    asm volatile("ld.global.u32 %0, [%1];" : "=r"(r.w[0]) : "l"(p));
  }
  return r;
}
// The floats of WORDS words of W elements (WORDS * 4 / sizeof(W) of them).
template <typename W, int WORDS>
__device__ __forceinline__ void unpack_words(const Words<WORDS>& r, float* out) {
  constexpr int per = 4 / int(sizeof(W));
#pragma unroll
  for (int i = 0; i < WORDS; ++i) unpack_word<W>(r.w[i], out + i * per);
}

// --- host side ---

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// y[T, N] (row stride ldy) = x[T, K] (row stride ldx) @ w[N, K]^T, fp32 accumulation, on `stream`.
// w (row-major [N, K], contiguous) is F32, BF16, F16, F8_E4M3 or F8_E4M3_B128 (with `ws`, its block
// scales [cdiv(N, 128), cdiv(K, 128)]; null for the others) and read in place. T <= 8 takes the
// bandwidth-bound few-rows kernel, more rows the tiled SIMT GEMM, which splits K into partial sums
// in `scratch` when its tiles are too few to fill the GPU: scratch holds matmul_scratch_bytes(T,
// K, N, sms) bytes, 16-byte aligned, or is null (no split). `sms`: the device's multiprocessor
// count. Issues kernels only (no host synchronisation): capturable in a CUDA graph.
void matmul_rows(const float* x, int64_t ldx, int64_t T, int64_t K, const void* w, DType wdt, const float* ws,
                 int64_t N, float* y, int64_t ldy, int sms, float* scratch, cudaStream_t stream);
// The scratch matmul_rows may use for these shapes (0: none); a function of the shapes alone.
size_t matmul_scratch_bytes(int64_t T, int64_t K, int64_t N, int sms);

// x [T, K] (K a multiple of 128) quantized per row and 128 consecutive k as vLLM and SGLang do for
// Qwen's FP8 releases: xs[b * Tp + t] = amax / 448 (1 where the block is zeros), xq [Tp, K] e4m3
// nearest (saturating) to x / xs; rows T .. Tp - 1 zeros. On `stream`. With up (same shape as x):
// silu(x) * up quantized instead (swiglu's input, the floats silu_mul writes).
void quantize_rows_b128(const float* x, int64_t T, int64_t Tp, int64_t K, uint8_t* xq, float* xs,
                        cudaStream_t stream, const float* up = nullptr);

// x [n] fp32 -> 16-bit (round to nearest even), 4 at a time where aligned.
template <typename H>
__global__ void round_to_16bit_kernel(const float* x, H* __restrict__ out, int64_t n) {
  wait_for_prior_kernels();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n4 = n / 4;
  for (int64_t i = i0; i < n4; i += stride) {
    const float4 v = reinterpret_cast<const float4*>(x)[i];
    if constexpr (std::is_same_v<H, __nv_bfloat16>) {
      reinterpret_cast<__nv_bfloat162*>(out)[2 * i] = __floats2bfloat162_rn(v.x, v.y);
      reinterpret_cast<__nv_bfloat162*>(out)[2 * i + 1] = __floats2bfloat162_rn(v.z, v.w);
    } else {
      reinterpret_cast<__half2*>(out)[2 * i] = __floats2half2_rn(v.x, v.y);
      reinterpret_cast<__half2*>(out)[2 * i + 1] = __floats2half2_rn(v.z, v.w);
    }
  }
  for (int64_t i = 4 * n4 + i0; i < n; i += stride) {
    if constexpr (std::is_same_v<H, __nv_bfloat16>) out[i] = __float2bfloat16_rn(x[i]);
    else out[i] = __float2half_rn(x[i]);
  }
}

// Launches it on `stream` (out: n 16-bit values).
template <typename H>
void round_to_16bit(const float* x, H* out, int64_t n, cudaStream_t stream) {
  const int64_t blocks = (n / 4 + 256) / 256;
  launch(round_to_16bit_kernel<H>, unsigned(blocks < 4096 ? blocks : 4096), 256, 0, stream, x, out, n);
}

// The sum of v over the warp, the same value (same order) in every lane.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// NeoX RoPE's inverse frequencies, by value (a kernel parameter): v[i] = theta^(-2i / rot), i < rot / 2.
template <int CAP>
struct InvFreq {
  float v[CAP];
  static InvFreq of(double theta, int rot) {
    InvFreq f{};
    for (int i = 0; i < rot / 2 && i < CAP; ++i) f.v[i] = float(1.0 / std::pow(theta, double(2 * i) / rot));
    return f;
  }
};

// A head's row src[hd] (lane l loads elements l + 32 m, m < PER; hd <= 32 PER) normed as rms_norm
// (the mean of squares in double, the same sums in the same order; weights w zero-centred) and
// rotated by NeoX RoPE (the pair (i, i + half) by the angle p inv_freq[i] in fp32, its cos and sin,
// rounded as the CPU rounds: no fused multiply-add) into the warp's shared row sh[hd], which the
// whole warp may read on return. qk_norm_rope's arithmetic, and the attention kernel's where it
// takes the norms in (gated_attention at decode).
template <int PER, int CAP>
__device__ __forceinline__ void norm_rope_row(const float* src, const void* w, DType wdt, float eps, int hd, int half,
                                              const InvFreq<CAP>& freq, float p, float* sh) {
  const int lane = int(threadIdx.x) % 32;
  float v[PER], wv[PER];
#pragma unroll
  for (int m = 0; m < PER; ++m) {
    const int i = lane + 32 * m;
    v[m] = i < hd ? load_after_wait(src + i) : 0.0f;
    wv[m] = i < hd ? load_weight(w, wdt, i) : 0.0f;
  }
  double ss = 0;
#pragma unroll
  for (int m = 0; m < PER; ++m) ss += double(v[m]) * v[m];
  ss = warp_sum(ss);
  const float inv = 1.0f / sqrtf(float(ss / double(hd)) + eps);  // as rms_norm
#pragma unroll
  for (int m = 0; m < PER; ++m) {
    const int i = lane + 32 * m;
    if (i < hd) sh[i] = v[m] * inv * (1.0f + wv[m]);
  }
  __syncwarp();
  for (int i = lane; i < half; i += 32) {
    float sn, cs;
    sincosf(p * freq.v[i], &sn, &cs);
    const float a = sh[i], b = sh[i + half];
    sh[i] = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn));
    sh[i + half] = __fadd_rn(__fmul_rn(b, cs), __fmul_rn(a, sn));
  }
  __syncwarp();
}

}  // namespace ballast::kernels::cuda::rows
