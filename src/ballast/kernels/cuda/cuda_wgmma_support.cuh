// Hopper's warpgroup products (wgmma.mma_async) for the kernels that tile their operands in shared
// memory: the FP8 expert tiles (cuda_moe.cu) and prefill attention over bf16 caches
// (cuda_attention.cu). They exist only in sm_90a code (BALLAST_CUDA_SM90A); the host takes them only
// where kWarpgroupMma holds and the device is an sm_90 one.
//
// Shared tiles are 128-byte-swizzled: row r's 16-byte chunk c of a 128-byte row at r * 128 +
// ((c ^ r % 8) * 16), 8-row atoms of 1024 bytes (1024-byte aligned, so the descriptors' base offset
// is 0), conflict-free for 16-byte copies. A row longer than 128 bytes is split into column blocks
// of 128 bytes, each a [rows][128 bytes] tile of its own.
// Descriptors (PTX ISA, "Matrix Descriptor Format" and "Canonical Layouts"): start address, leading
// and stride byte offsets in 16-byte units, layout type 1 (128-byte swizzle).
// - K-major (the operand's k runs along the 128-byte rows: A, and B as N rows of k): the stride
//   byte offset is 1024 (from one 8-row atom to the next), the leading one unused (1); a k step
//   inside a row adds its bytes to the start address.
// - MN-major (B's n runs along the rows, its k down them: V of P V, stored as [key][dim]): the
//   canonical layout ((8 elements, 8 chunks, m), (8 rows, k)) : ((1, 8, LBO), (64, SBO)) elements,
//   so the stride byte offset (SBO) is 1024 (the next 8 rows of k) and the leading one (LBO) is the
//   stride of the 64-element column blocks along n.
#pragma once

#include <cstdint>

namespace ballast::kernels::cuda {

#if defined(BALLAST_CUDA_SM90A)
constexpr bool kWarpgroupMma = true;
#else
constexpr bool kWarpgroupMma = false;
#endif

// Byte offset of (row r, 16-byte chunk c) in a 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t swizzled128(int r, int c) {
  return uint32_t(r) * 128 + uint32_t((c ^ (r & 7)) << 4);
}

// K-major descriptor, whole (the FP8 expert tiles).
__device__ __forceinline__ uint64_t sw128_kmajor_desc(uint32_t smem_addr) {
  return uint64_t((smem_addr & 0x3ffff) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
// The descriptors' halves where a loop issues many products (prefill attention): the low word
// (start address, leading byte offset) computed, the high one (stride byte offset 1024, the
// 128-byte swizzle) the same for every descriptor here and joined in the asm, so no 64-bit value a
// descriptor is built (with the copies' shared addresses, 1.58 -> 1.51 ms a layer: docs/perf.md;
// ptxas still moves both words to uniform registers a product). A slice `bytes` further on is the
// low word plus bytes / 16 (the encoded address is 14 bits, shared memory 228 KB: the sum never
// carries out of it).
constexpr uint32_t kSw128DescHi = (1024 >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t sw128_kmajor_desc_lo(uint32_t smem_addr) { return (smem_addr & 0x3ffff) >> 4 | (1u << 16); }
__device__ __forceinline__ uint32_t sw128_mnmajor_desc_lo(uint32_t smem_addr, uint32_t block_stride_bytes) {
  return (smem_addr & 0x3ffff) >> 4 | ((block_stride_bytes & 0x3ffff) >> 4) << 16;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Until at most N committed groups of this warpgroup's products are in flight (the latest N).
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
#else
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
#endif
__device__ __forceinline__ void wgmma_wait_all() { wgmma_wait<0>(); }

// Keeps the compiler from touching accumulators before the wgmma that writes them has been waited
// for (to it, an asm's outputs are ready when the asm is issued).
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Shared-memory writes of the generic proxy (st.shared, cp.async) made visible to the tensor cores'
// reads (the async proxy).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// The 32 accumulators of an m64n64 product, as wgmma's operand list names them.
#define BALLAST_WGMMA_D32                                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),      \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),     \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define BALLAST_WGMMA_D32_LIST                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"

// The 64 accumulators of an m64n128 product (the FP8 expert tiles'), likewise.
#define BALLAST_WGMMA_D64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
  "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), \
  "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), \
  "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), \
  "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
  "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
  "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define BALLAST_WGMMA_D64_LIST                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d (+)= A B for A 64 x 16 and B 16 x 64, bf16, both K-major in shared memory (A: 64 rows of k;
// B: 64 rows of k, i.e. B^T as stored; a_lo, b_lo: their descriptors' low words); `accumulate`
// false starts d. Warp w of the warpgroup holds rows 16 w + g and + 8 (g = lane / 4): d[4 j + e] at
// column 8 j + 2 (lane % 4) + e % 2, row + 8 for e >= 2 (mma.sync's m16n8 layout, an 8-column block
// a j).
__device__ __forceinline__ void wgmma_bf16_ss(float (&d)[32], uint32_t a_lo, uint32_t b_lo, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %34, 0;\n"
      "mov.b64 da, {%32, %35};\nmov.b64 db, {%33, %35};\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " BALLAST_WGMMA_D32_LIST ", da, db, p, 1, 1, 0, 0;\n}\n"
      : BALLAST_WGMMA_D32
      : "r"(a_lo), "r"(b_lo), "r"(int(accumulate)), "n"(kSw128DescHi));
#else
  __trap();  // (kWarpgroupMma: the host never launches it without sm_90a code)
#endif
}

// d += A B for A 64 x 16 bf16 in registers (a[0..3]: mma.sync m16n8k16's A fragment of the warp's 16
// rows) and B 16 x 64 bf16 MN-major in shared memory (16 rows of k, each 64 consecutive n; b_lo its
// descriptor's low word).
__device__ __forceinline__ void wgmma_bf16_rs_mn(float (&d)[32], const uint32_t (&a)[4], uint32_t b_lo) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %37, 0;\nmov.b64 db, {%36, %38};\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " BALLAST_WGMMA_D32_LIST
      ", {%32, %33, %34, %35}, db, p, 1, 1, 1;\n}\n"
      : BALLAST_WGMMA_D32
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b_lo), "r"(1), "n"(kSw128DescHi));
#else
  __trap();
#endif
}

}  // namespace ballast::kernels::cuda
