// mma.sync tensor-core products and asynchronous copies for the kernels whose operands are fp32
// activations (prefill attention, the chunked delta rule): 3xTF32 where fp32 accuracy is asked for,
// bf16 m16n8k16 where bf16 products are, e4m3 m16n8k32 for block-scaled FP8 weights with x
// quantized per 128-block (the small FP8 expert tiles); the copies serve the FP8 expert tiles too.
//
// 3xTF32: each operand is split into TF32 parts, a = a_big + a_small, and a b = a_big b_small +
// a_small b_big + a_big b_big, three mma.sync m16n8k8 TF32 products summed in fp32: within 2^-19 of
// a b (the term left out, a_small b_small, and the bits of a_small the tensor cores drop, each
// < 2^-20) where plain TF32 is within 2^-10, at three times its products.
//
// Fragments of m16n8k8 (g = lane / 4, t = lane % 4): A (16 x 8, row-major) a0 (g, t), a1 (g + 8, t),
// a2 (g, t + 4), a3 (g + 8, t + 4); B (8 x 8) b0 (k t, n g), b1 (k t + 4, n g); C (16 x 8) c0 (g, 2t),
// c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1). The order of k inside a step is free if both
// operands follow it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "ballast/core/dtype.h"

namespace ballast::kernels::cuda {

struct Tf32Pair {
  uint32_t big, small;
};

// x = big + small exactly: big keeps x's top 11 significant bits (a TF32 value), small the rest;
// small goes to the tensor cores as it is, which read its top 11 bits (|small| < 2^-10 |x|, so what
// they drop is < 2^-20 |x|). Two instructions, where cvt.rna.tf32 takes several.
__device__ __forceinline__ Tf32Pair tf32_split(float x) {
  const uint32_t big = __float_as_uint(x) & 0xffffe000u;
  return {big, __float_as_uint(x - __uint_as_float(big))};
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d += a b in 3xTF32: A fragment a[4] (a0 .. a3 above), B fragment b[2].
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const Tf32Pair (&a)[4], const Tf32Pair (&b)[2]) {
  mma_tf32(d, a[0].small, a[1].small, a[2].small, a[3].small, b[0].big, b[1].big);
  mma_tf32(d, a[0].big, a[1].big, a[2].big, a[3].big, b[0].small, b[1].small);
  mma_tf32(d, a[0].big, a[1].big, a[2].big, a[3].big, b[0].big, b[1].big);
}

// The same with the big product into hi and the two small ones into lo (hi + lo is a b): twice the
// chains of dependent mma in flight where the accumulators are few.
__device__ __forceinline__ void mma_3xtf32_split(float (&hi)[4], float (&lo)[4], const Tf32Pair (&a)[4],
                                                 const Tf32Pair (&b)[2]) {
  mma_tf32(lo, a[0].small, a[1].small, a[2].small, a[3].small, b[0].big, b[1].big);
  mma_tf32(lo, a[0].big, a[1].big, a[2].big, a[3].big, b[0].small, b[1].small);
  mma_tf32(hi, a[0].big, a[1].big, a[2].big, a[3].big, b[0].big, b[1].big);
}

// The same operands and products where TF32 precision is asked for (kSplit false, under bf16 matrix
// products): x rounded to the nearest TF32 (within 2^-11 of x, finer than bf16's 2^-8) and one
// product instead of three; kSplit: 3xTF32 as above.
template <bool kSplit>
__device__ __forceinline__ Tf32Pair tf32_operand(float x) {
  if constexpr (kSplit) {
    return tf32_split(x);
  } else {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return {r, 0u};
  }
}
template <bool kSplit>
__device__ __forceinline__ void mma_tf32x(float (&d)[4], const Tf32Pair (&a)[4], const Tf32Pair (&b)[2]) {
  if constexpr (kSplit) mma_3xtf32(d, a, b);
  else mma_tf32(d, a[0].big, a[1].big, a[2].big, a[3].big, b[0].big, b[1].big);
}

// Two floats as the bf16 pair of an mma operand register: lo (the smaller k) in the low half.
__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a b, mma.sync m16n8k16 bf16 with fp32 accumulation. Fragments (g = lane / 4, t = lane % 4;
// each register a pair of k = 2i, 2i + 1): A (16 x 16) a0 (g, k 2t), a1 (g + 8, k 2t), a2 (g, k 2t + 8),
// a3 (g + 8, k 2t + 8); B (16 x 8) b0 (k 2t, n g), b1 (k 2t + 8, n g); C as m16n8k8's.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The accumulators of the 8-column blocks j and j + 1 (rows g, g + 8; columns 2t, 2t + 1) as one
// 16-k bf16 A operand of m16n8k16, as they lie: a product's output feeds the next product (the
// softmax's P in attention, the state and V' in the delta rule; wgmma's A of a warp's rows too).
template <int ST>
__device__ __forceinline__ void accumulators_as_a(const float (&s)[ST][4], int j, uint32_t (&a)[4]) {
  a[0] = bf16_pair(s[j][0], s[j][1]);
  a[1] = bf16_pair(s[j][2], s[j][3]);
  a[2] = bf16_pair(s[j + 1][0], s[j + 1][1]);
  a[3] = bf16_pair(s[j + 1][2], s[j + 1][3]);
}

// Four 8 x 8 bf16 matrices from shared memory, lane l giving the address of row l % 8 of matrix
// l / 8: a whole A fragment of m16n8k16, or the B fragments of two 8-column blocks; .trans for a
// B whose rows in memory run along the product's k (V in attention, K' in the delta rule).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned a = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned a = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// d += a b on the FP8 tensor cores (m16n8k32, e4m3 in, fp32 sums; sm_89 and later): a holds four
// e4m3 a register (rows g, g + 8, g, g + 8 of the 16; k = 4 tq .. + 3, then 16 + 4 tq .. + 3), b
// two (column g; the same k). g = lane / 4, tq = lane % 4.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#elif defined(__CUDA_ARCH__)
  __trap();  // callers check the device first: never a silent zero product
#endif
}

// A warp's 128 values of a row (4 a lane, v) quantized as the FP8 tensor-core paths take x: the
// block's scale sc = amax / 448 (1 for zeros), each value / sc to the nearest e4m3 (saturating),
// packed in a word (the lane's first value in the low byte).
__device__ __forceinline__ uint32_t quantize_b128(float4 v, float& sc) {
  float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  sc = amax > 0.f ? amax / kE4m3Max : 1.0f;
  const float q[4] = {v.x / sc, v.y / sc, v.z / sc, v.w / sc};
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) packed |= uint32_t(__nv_cvt_float_to_fp8(q[i], __NV_SATFINITE, __NV_E4M3)) << (8 * i);
  return packed;
}

// 16 bytes global -> shared without registers; zeros where !pred (nothing is read then, but src
// must still be an address of the allocation).
__device__ __forceinline__ void cp_async16(uint32_t dst_shared, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst_shared), "l"(src), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  cp_async16(unsigned(__cvta_generic_to_shared(dst)), src, pred);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Every committed group but the latest N has landed (in this thread; a barrier makes it the block's).
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
__device__ __forceinline__ void cp_async_wait_all_but_last() { cp_async_wait<1>(); }
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait<0>(); }

}  // namespace ballast::kernels::cuda
