// CudaOps::attention: causal softmax attention over paged K/V caches, varlen over the sequences of
// a pass (the CPU reference is cpu/cpu_attention.cpp). fp32 scores, fp32 online softmax. The
// caches are fp32, or bf16 (half the bytes a step reads) where the backend allocates them so under
// bf16 products (CudaBackend::kv_cache_dtype); fp32 products (3xTF32 tiles) take fp32 caches.
//
// Kernels, in stream order:
// 1. the new rows' K and V go to the caches at slot_mapping (a row attends to itself and to the
//    rows before it: the write completes before any read, by stream order); gated_attention with
//    one new row a sequence has none: kernel 2 norms and rotates q and K from the projections,
//    writes the new row itself and copies the rows before it from the caches before its wait;
// 2. rows of sequences with few new rows (decode, verification; all rows when max_query_len <
//    kTileMinRows): one block of 4 warps per (row, up to 4 query heads of one KV head, kv split),
//    each cache row loaded once for the block's heads; each warp streams every 4th cache row of
//    the split, each lane holding consecutive elements of the head dimension (a row in one or two
//    16-byte loads a lane); the warps merge in shared memory. A row's sequence is found by a
//    binary search in cu_seqlens on the device. When rows x head groups are too few to fill the
//    GPU, each row's cache rows are split
//    into up to kMaxSplits pieces (flash-decoding), written as partial (max, sum, unnormalised
//    output) to scratch; the split of a row's cache rows is computed on the device from its own
//    length, so every row is covered whatever the host's max_kv_len says;
// 3. sequences of at least kTileMinRows new rows (prefill): one block per (tile of rows, query
//    head), the cache rows streamed through shared memory 32 at a time and shared by the tile's
//    rows (launched over B x ceil(max_query_len / tile) tiles; tiles past a sequence's rows exit):
//    on the tensor cores for head dims of 64, 128 and 256 (128-row tiles: attention_mma_kernel in
//    3xTF32, attention_bf16_kernel under CudaOptions::bf16_matmul, attention_wgmma_kernel there
//    instead on Hopper with sm_90a code over bf16 caches, 64 cache rows a step), else on the SIMT
//    cores (attention_tiled_kernel, 32-row tiles);
// 4. with splits, the merge of the partials of kernel 2's rows (gated_attention: times sigmoid(gate)).
#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "ballast/core/error.h"
#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_mma_support.cuh"
#include "ballast/kernels/cuda/cuda_rows_support.cuh"
#include "ballast/kernels/cuda/cuda_support.cuh"
#include "ballast/kernels/cuda/cuda_wgmma_support.cuh"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

using namespace cuda;
using cuda::rows::InvFreq;
using cuda::rows::load_words_after_wait;
using cuda::rows::norm_rope_row;
using cuda::rows::unpack_words;

namespace {

constexpr int kAttnWarps = 4;         // warps per (row, head, split) block
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kMaxHeadDim = 256;      // 8 elements per lane
constexpr int kMaxSplits = 32;        // kv splits of one row (flash-decoding)
constexpr int kMinSplitRows = 64;     // cache rows per split, at least (on the host's max_kv_len)
constexpr int kGatedMaxHalf = 64;     // gated_attention's fused decode: rotations of up to 128 dims
constexpr int kPrefetchBytes = 24576; // gated_attention's fused decode: a split's first cache rows
                                      // copied before the wait (the static limit: 48 KB a block)

// Cache elements: KV = float, or __nv_bfloat16 where the backend keeps bf16 caches (under bf16
// products: CudaBackend::kv_cache_dtype), read as floats. The caches are what kernels before wrote
// (attention_write_kv_kernel, overlapped by programmatic launches): coherent loads after the wait.
template <typename KV>
__device__ __forceinline__ float kv_at(const void* cache, int64_t i) {
  return load_after_wait(static_cast<const KV*>(cache) + i);
}

// The new rows' K and V at their slots (rounded to bf16 in bf16 caches); an out-of-range slot is
// skipped.
template <typename KV>
__global__ void attention_write_kv_kernel(const float* k_new, const float* v_new,
                                          const int32_t* slot_mapping, int64_t T, int64_t row,
                                          int64_t cache_rows, KV* __restrict__ k_cache,
                                          KV* __restrict__ v_cache) {
  wait_for_prior_kernels();
  const int64_t n = T * row;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / row, e = i - t * row;
    const int64_t s = slot_mapping[t];
    if (s < 0 || s >= cache_rows) continue;
    k_cache[s * row + e] = KV(k_new[i]);
    v_cache[s * row + e] = KV(v_new[i]);
  }
}

struct AttentionArgs {
  const float* q;        // [T, Hq, hd]
  const void* k_cache;   // [blocks, bs, Hkv, hd] of float or __nv_bfloat16 (the kernels' KV)
  const void* v_cache;
  const int32_t* cu;      // [B + 1]
  const int32_t* kv_lens; // [B]
  const int32_t* tables;  // [B, W], or [R, W] with table_rows
  const int32_t* table_rows;  // [B]: sequence b's row of tables (null: row b)
  float* out;             // [T, Hq, hd] (splits == 1)
  float* part;            // [T, Hq, splits, hd] unnormalised outputs (splits > 1)
  float* part_ml;         // [T, Hq, splits, 2] max and sum of exponentials (splits > 1)
  int B, T, Hq, Hkv, hd, bs, W, splits;
  int bs_shift;       // log2(bs) where bs is a power of two (rows to blocks by shifts), else -1
  int tile_min_rows;  // sequences of at least this many new rows take the tiled kernel
  int64_t blocks;
  float scale;
  // gated_attention at decode (attention_kernel<.., true>: one new row a sequence): q and the new
  // row's K come from the projections (qg's heads [q | gate], k_new before its norm and rotation),
  // normed and rotated in the kernel; the new row is read from shared memory where the caches would
  // give it (the rows kernel's blocks that hold it write it to the caches); outputs times
  // sigmoid(gate).
  const float* qg;        // [T, Hq, 2 hd]
  const float* k_new;     // [T, Hkv, hd]
  const float* v_new;     // [T, Hkv, hd]
  const int32_t* slots;   // [T] slot_mapping
  const int32_t* pos;     // [T] positions
  const void* q_norm;
  const void* k_norm;
  DType q_norm_dt, k_norm_dt;
  float eps;
  int half;               // rot / 2 <= kGatedMaxHalf
  int64_t cache_rows;     // blocks * bs: slots at or past it are skipped (as attention_write_kv_kernel)
  InvFreq<kGatedMaxHalf> freq;
};

// Sequence b's block table.
__device__ __forceinline__ const int32_t* table_of(const AttentionArgs& a, int b) {
  return a.tables + int64_t(a.table_rows ? a.table_rows[b] : b) * a.W;
}

// The sequence of row t: the last b with cu[b] <= t (sequences without rows are passed over).
__device__ __forceinline__ int sequence_of(const int32_t* cu, int B, int t) {
  int lo = 0, hi = B - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// The cache row (block * bs + row in it; < blocks bs <= INT32_MAX, checked on the host) holding
// position r of the sequence whose block table is `table`, or -1 at or past `end` (<= W bs <=
// INT32_MAX) or where the table names no block. Rows to blocks by shifts where bs is a power of two.
__device__ __forceinline__ int cache_slot(const AttentionArgs& a, const int32_t* table, int64_t r, int64_t end) {
  if (r >= end) return -1;
  const int ri = int(r);
  const int64_t blk = table[a.bs_shift >= 0 ? ri >> a.bs_shift : ri / a.bs];
  return blk >= 0 && blk < a.blocks ? int(blk * a.bs + (a.bs_shift >= 0 ? ri & (a.bs - 1) : ri % a.bs)) : -1;
}

// Elements V lane .. V lane + V - 1 of a cache row (the head's, at element `base`; zeros past hd or
// where !ok): with hd a multiple of V (so base is too) one or two 16-byte loads or fewer bytes, else
// element by element. (Elements lane + 32 j made 2-byte loads of bf16 rows: the decode kernel took
// 29 us a layer at batch 1 where fp32 rows took 16.)
template <int V, typename KV>
__device__ __forceinline__ void kv_row(const void* cache, int64_t base, int lane, int hd, bool ok, float (&x)[V]) {
  constexpr int WORDS = V * int(sizeof(KV)) / 4, EL = 4 / int(sizeof(KV));  // words a lane, elements a word
  const int e0 = V * lane;
  if (WORDS >= 1 && ok && e0 < hd && hd % V == 0) {
    const KV* p = static_cast<const KV*>(cache) + base + e0;
    if constexpr (WORDS > 4) {
#pragma unroll
      for (int q = 0; q < WORDS / 4; ++q) unpack_words<KV, 4>(load_words_after_wait<4>(p + 4 * EL * q), x + 4 * EL * q);
    } else if constexpr (WORDS >= 1) {
      unpack_words<KV, WORDS>(load_words_after_wait<WORDS>(p), x);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = ok && e0 + i < hd ? kv_at<KV>(cache, base + e0 + i) : 0.0f;
  }
}

// The same elements as kv_row, of a row copied to shared memory (hd elements from `row`).
template <int V, typename KV>
__device__ __forceinline__ void kv_row_shared(const KV* row, int lane, int hd, bool ok, float (&x)[V]) {
  constexpr int WORDS = V * int(sizeof(KV)) / 4;
  const int e0 = V * lane;
  if (WORDS >= 1 && ok && e0 < hd && hd % V == 0) {
    const KV* p = row + e0;
    if constexpr (WORDS >= 4) {
#pragma unroll
      for (int q = 0; q < WORDS / 4; ++q) {
        const uint4 u = reinterpret_cast<const uint4*>(p)[q];
        unpack_words<KV, 4>(rows::Words<4>{{u.x, u.y, u.z, u.w}}, x + q * 4 * (4 / int(sizeof(KV))));
      }
    } else if constexpr (WORDS == 2) {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      unpack_words<KV, 2>(rows::Words<2>{{u.x, u.y}}, x);
    } else if constexpr (WORDS == 1) {
      unpack_words<KV, 1>(rows::Words<1>{{*reinterpret_cast<const uint32_t*>(p)}}, x);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = ok && e0 + i < hd ? float(row[e0 + i]) : 0.0f;
  }
}

// V = elements per lane (hd <= 32 V), lane l holding V l .. V l + V - 1. Block (row t, GB query heads
// of one KV head, split): each cache row is loaded once for the GB heads (a block a head loaded the
// rows of a KV head once for each of its G query heads). kGated: gated_attention at decode (the
// fields of AttentionArgs under that name); every cache row it reads was written by earlier passes
// (the new one comes from shared memory), so the split's first rows are copied into shared memory
// before the wait, while the kernel before (the q/k/v products) still runs.
template <int V, int GB, typename KV, bool kGated = false>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const AttentionArgs a) {
  if constexpr (!kGated) wait_for_prior_kernels();
  const int t = int(blockIdx.x), hq0 = int(blockIdx.y) * GB, split = int(blockIdx.z);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int hd = a.hd;
  const int kvh = hq0 / (a.Hq / a.Hkv);  // (GB divides the group: the block's heads share it)
  __shared__ float sm_m[kAttnWarps][GB], sm_l[kAttnWarps][GB];
  __shared__ float sm_acc[kAttnWarps][GB][V * 32];
  __shared__ float sm_new[kGated ? GB + 2 : 1][V * 32];  // kGated: the GB q heads, the new K, the new V
  // kGated: the split's first kPre cache rows' K and V, and whether each is readable.
  constexpr int kPre = kGated ? kPrefetchBytes / (2 * 32 * V * int(sizeof(KV))) : 1;
  __shared__ alignas(16) KV sm_pre[2][kPre][32 * V];
  __shared__ bool sm_pre_ok[kPre];

  // The row's sequence and how many cache rows it sees (0 where the layout is inconsistent).
  const int b = sequence_of(a.cu, a.B, t);
  const int64_t start = a.cu[b], n = int64_t(a.cu[b + 1]) - start;
  if (n >= a.tile_min_rows) return;  // the tiled kernel's (uniform over the block)
  int64_t len = 0;
  if (t >= start && t < start + n) len = int64_t(a.kv_lens[b]) - n + (t - start) + 1;
  len = len < 0 ? 0 : (len > int64_t(a.W) * a.bs ? int64_t(a.W) * a.bs : len);
  // This split's cache rows [r0, r1).
  const int64_t chunk = (len + a.splits - 1) / a.splits;
  const int64_t r0 = int64_t(split) * chunk, r1 = r0 + chunk < len ? r0 + chunk : len;

  // kGated: the row's new cache row (position len - 1, its sequence's one new row) where this split
  // holds it, else -1.
  const int64_t new_r = kGated && len > 0 && r0 <= len - 1 && len - 1 < r1 ? len - 1 : -1;
  const int32_t* table = table_of(a, b);
  const int64_t row = int64_t(a.Hkv) * hd;
  int npre = 0;  // kGated: the split's rows [r0, r0 + npre) are in sm_pre
  if constexpr (kGated) {
    // 16-byte pieces of a row's head (rows of whole pieces only), K's and V's of each row in turn.
    const int pieces = hd * int(sizeof(KV)) % 16 == 0 ? hd * int(sizeof(KV)) / 16 : 0;
    npre = pieces == 0 || r1 <= r0 ? 0 : int(r1 - r0 < kPre ? r1 - r0 : kPre);
    constexpr int EP = 16 / int(sizeof(KV));  // elements a piece
    for (int i = int(threadIdx.x); i < npre * 2 * pieces; i += kAttnThreads) {
      const int j = i / (2 * pieces), m = (i / pieces) % 2, q = i % pieces;
      const int slot = r0 + j == new_r ? -1 : cache_slot(a, table, r0 + j, r1);  // (new_r: from sm_new)
      if (m == 0 && q == 0) sm_pre_ok[j] = slot >= 0;
      const KV* src = static_cast<const KV*>(m ? a.v_cache : a.k_cache) +
                      (slot >= 0 ? int64_t(slot) * row + int64_t(kvh) * hd : 0) + q * EP;
      cp_async16(&sm_pre[m][j][q * EP], src, slot >= 0);
    }
    cp_async_commit();
    wait_for_prior_kernels();
    // The block's q heads and the new K, normed and rotated (a warp a row), and the new V; then K
    // and V as the caches hold them, written there by the block of the KV head's first q heads.
    // (The position, the slot and V first: their loads overlap the norms.)
    const float p = float(load_after_wait(a.pos + t));
    const int64_t slot = load_after_wait(a.slots + t);
    constexpr int VE = kMaxHeadDim / kAttnThreads;  // V's elements a thread
    float vv[VE];
#pragma unroll
    for (int i = 0; i < VE; ++i) {
      const int e = int(threadIdx.x) + i * kAttnThreads;
      vv[i] = e < hd ? load_after_wait(a.v_new + (int64_t(t) * a.Hkv + kvh) * hd + e) : 0.0f;
    }
    for (int j = warp; j <= GB; j += kAttnWarps) {
      const bool is_q = j < GB;
      norm_rope_row<V>(is_q ? a.qg + (int64_t(t) * a.Hq + hq0 + j) * 2 * hd : a.k_new + (int64_t(t) * a.Hkv + kvh) * hd,
                       is_q ? a.q_norm : a.k_norm, is_q ? a.q_norm_dt : a.k_norm_dt, a.eps, hd, a.half, a.freq, p,
                       sm_new[j]);
    }
    __syncthreads();
    const bool writes = new_r >= 0 && hq0 % (a.Hq / a.Hkv) == 0 && slot >= 0 && slot < a.cache_rows;
    const int64_t at = slot * int64_t(a.Hkv) * hd + int64_t(kvh) * hd;
#pragma unroll
    for (int i = 0; i < VE; ++i) {
      const int e = int(threadIdx.x) + i * kAttnThreads;
      if (e >= hd) break;
      const KV kq = KV(sm_new[GB][e]), vq = KV(vv[i]);
      sm_new[GB][e] = float(kq);
      sm_new[GB + 1][e] = float(vq);
      if (writes) {  // (the caches are the kernel's to write: a.k_cache is const for the other kernels)
        static_cast<KV*>(const_cast<void*>(a.k_cache))[at + e] = kq;
        static_cast<KV*>(const_cast<void*>(a.v_cache))[at + e] = vq;
      }
    }
    cp_async_wait_all();
    __syncthreads();
  }

  float qv[GB][V], acc[GB][V], m[GB], l[GB];
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    const float* qrow = kGated ? sm_new[g] : a.q + (int64_t(t) * a.Hq + hq0 + g) * hd;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int e = V * lane + j;
      qv[g][j] = e < hd ? qrow[e] : 0.0f;
      acc[g][j] = 0.0f;
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  // Two cache rows per step (rows r and r + kAttnWarps), both loaded before either is reduced.
  constexpr int kRowsPerStep = 2;
  for (int64_t r = r0 + warp; r < r1; r += kRowsPerStep * kAttnWarps) {
    float kx[kRowsPerStep][V], vx[kRowsPerStep][V];
    bool ok[kRowsPerStep];
#pragma unroll
    for (int u = 0; u < kRowsPerStep; ++u) {
      if (kGated && r + u * kAttnWarps == new_r) {  // (uniform over the warp)
        ok[u] = true;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int e = V * lane + j;
          kx[u][j] = e < hd ? sm_new[GB][e] : 0.0f;
          vx[u][j] = e < hd ? sm_new[GB + 1][e] : 0.0f;
        }
        continue;
      }
      if (kGated && r + u * kAttnWarps - r0 < npre) {  // (uniform over the warp)
        const int j = int(r + u * kAttnWarps - r0);
        ok[u] = sm_pre_ok[j];
        kv_row_shared<V, KV>(sm_pre[0][j], lane, hd, ok[u], kx[u]);
        kv_row_shared<V, KV>(sm_pre[1][j], lane, hd, ok[u], vx[u]);
        continue;
      }
      const int slot = cache_slot(a, table, r + u * kAttnWarps, r1);
      ok[u] = slot >= 0;  // uniform over the warp; an unreadable row is left out
      const int64_t base = ok[u] ? int64_t(slot) * row + int64_t(kvh) * hd : 0;
      kv_row<V, KV>(a.k_cache, base, lane, hd, ok[u], kx[u]);
      kv_row<V, KV>(a.v_cache, base, lane, hd, ok[u], vx[u]);
    }
    float s[GB][kRowsPerStep];
#pragma unroll
    for (int g = 0; g < GB; ++g)
#pragma unroll
      for (int u = 0; u < kRowsPerStep; ++u) {
        float d = 0.0f;
#pragma unroll
        for (int j = 0; j < V; ++j) d += qv[g][j] * kx[u][j];
        s[g][u] = d;
      }
#pragma unroll
    for (int o = 16; o > 0; o /= 2)
#pragma unroll
      for (int g = 0; g < GB; ++g)
#pragma unroll
        for (int u = 0; u < kRowsPerStep; ++u) s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], o);
#pragma unroll
    for (int g = 0; g < GB; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < kRowsPerStep; ++u) {
        s[g][u] = ok[u] ? s[g][u] * a.scale : -INFINITY;
        m_new = fmaxf(m_new, s[g][u]);
      }
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing readable yet
      const float corr = expf(m[g] - m_use);                     // 0 while m is -inf
      float p[kRowsPerStep];
#pragma unroll
      for (int u = 0; u < kRowsPerStep; ++u) p[u] = expf(s[g][u] - m_use);
      l[g] = l[g] * corr;
#pragma unroll
      for (int u = 0; u < kRowsPerStep; ++u) l[g] += p[u];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float x = acc[g][j] * corr;
#pragma unroll
        for (int u = 0; u < kRowsPerStep; ++u) x += p[u] * vx[u][j];
        acc[g][j] = x;
      }
      m[g] = m_new;
    }
  }

  // Merge the warps, head by head.
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
#pragma unroll
    for (int j = 0; j < V; ++j) sm_acc[warp][g][V * lane + j] = acc[g][j];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, sm_m[w][g]);
    float wscale[kAttnWarps];
    float L = 0.0f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      wscale[w] = sm_m[w][g] == -INFINITY ? 0.0f : expf(sm_m[w][g] - M);
      L += sm_l[w][g] * wscale[w];
    }
    const int64_t item = int64_t(t) * a.Hq + hq0 + g;
    for (int e = int(threadIdx.x); e < hd; e += kAttnThreads) {
      float o = 0.0f;
#pragma unroll
      for (int w = 0; w < kAttnWarps; ++w) o += sm_acc[w][g][e] * wscale[w];
      if (a.splits == 1) {
        const float y = L > 0.0f ? o / L : 0.0f;
        a.out[item * hd + e] = kGated ? y * sigmoidf_(load_after_wait(a.qg + item * 2 * hd + hd + e)) : y;
      } else {
        a.part[(item * a.splits + split) * hd + e] = o;
      }
    }
    if (a.splits > 1 && threadIdx.x == 0) {
      a.part_ml[(item * a.splits + split) * 2] = M;
      a.part_ml[(item * a.splits + split) * 2 + 1] = L;
    }
  }
}

// Prefill: block (tile of kTileRows new rows of one sequence, query head), 8 warps. The cache rows
// the tile sees stream through shared memory kTileKv at a time, read once for all its rows
// (the row kernel reads them once per row). Warp w owns the tile's rows w + 8 r (r < 4): their
// scores against the kTileKv cache rows (lane = cache row), their online softmax (warp
// reductions) and their outputs (lane + 32 c of hd).
constexpr int kTileRows = 32;
constexpr int kTileKv = 32;
constexpr int kTileWarps = 8;
constexpr int kTileThreads = kTileWarps * 32;
constexpr int kTileRowsPerWarp = kTileRows / kTileWarps;  // 4
constexpr int kTileMinRows = 16;

// Shared memory of the tiled kernel for hd <= 32 V, in floats: Qs [kTileRows][32 V + 4],
// Ks [kTileKv][32 V + 4] (rows of whole float4s, (32 V + 4) / 4 odd: no bank conflicts when the
// lanes read different rows), Vs [kTileKv][32 V], Ps [kTileRows][kTileKv + 1], kval [kTileKv].
__host__ __device__ constexpr int tile_smem_floats(int V) {
  return kTileRows * (32 * V + 4) + kTileKv * (32 * V + 4) + kTileKv * 32 * V + kTileRows * (kTileKv + 1) + kTileKv;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int V, typename KV>
__global__ void __launch_bounds__(kTileThreads, 2) attention_tiled_kernel(const AttentionArgs a, int tiles_per_seq) {
  wait_for_prior_kernels();
  constexpr int HD = 32 * V, LQ = HD + 4, LQ4 = LQ / 4, LP = kTileKv + 1;
  extern __shared__ float4 smem_f4[];
  float* Qs = reinterpret_cast<float*>(smem_f4);
  float* Ks = Qs + kTileRows * LQ;
  float* Vs = Ks + kTileKv * LQ;
  float* Ps = Vs + kTileKv * HD;
  float* kval = Ps + kTileRows * LP;  // 1: cache row of the step is readable, 0: not
  const float4* Q4 = reinterpret_cast<const float4*>(Qs);
  const float4* K4 = reinterpret_cast<const float4*>(Ks);

  const int b = int(blockIdx.x) / tiles_per_seq, tile = int(blockIdx.x) % tiles_per_seq, hq = int(blockIdx.y);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  if (b >= a.B) return;
  const int64_t start = a.cu[b], n = int64_t(a.cu[b + 1]) - start;
  const int64_t i0 = int64_t(tile) * kTileRows;  // the tile's first row in the sequence
  if (n < a.tile_min_rows || i0 >= n || start < 0 || start + n > a.T) return;
  const int rows = int(n - i0 < kTileRows ? n - i0 : kTileRows);
  const int64_t first = int64_t(a.kv_lens[b]) - n;  // cache position of the sequence's first new row
  const int64_t cap = int64_t(a.W) * a.bs;
  // Cache rows the tile sees: [0, first + i0 + rows), within the table.
  int64_t kv_end = first + i0 + rows;
  kv_end = kv_end < 0 ? 0 : (kv_end > cap ? cap : kv_end);
  const int hd = a.hd, kvh = hq / (a.Hq / a.Hkv);
  const int64_t row = int64_t(a.Hkv) * hd;
  const int32_t* table = table_of(a, b);

  for (int i = warp; i < kTileRows; i += kTileWarps) {
    const float* qrow = a.q + ((start + i0 + i) * a.Hq + hq) * hd;
#pragma unroll
    for (int c = 0; c < V; ++c) {
      const int e = lane + 32 * c;
      Qs[i * LQ + e] = (i < rows && e < hd) ? qrow[e] : 0.0f;
    }
    if (lane < 4) Qs[i * LQ + HD + lane] = 0.0f;
  }
  float m[kTileRowsPerWarp], l[kTileRowsPerWarp], o[kTileRowsPerWarp][V];
  int pos[kTileRowsPerWarp];  // cache position of each of this warp's rows (-1: past the tile)
#pragma unroll
  for (int r = 0; r < kTileRowsPerWarp; ++r) {
    const int i = warp + kTileWarps * r;
    m[r] = -INFINITY;
    l[r] = 0.0f;
    pos[r] = i < rows ? int(first + i0 + i) : -1;
#pragma unroll
    for (int c = 0; c < V; ++c) o[r][c] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < kv_end; k0 += kTileKv) {
    __syncthreads();  // the previous step's Ks, Vs are read (and, the first time, Qs written)
#pragma unroll 1
    for (int rr = warp; rr < kTileKv; rr += kTileWarps) {
      const int slot = cache_slot(a, table, k0 + rr, kv_end);
      const bool ok = slot >= 0;
      const int64_t base = ok ? int64_t(slot) * row + int64_t(kvh) * hd : 0;
#pragma unroll
      for (int c = 0; c < V; ++c) {
        const int e = lane + 32 * c;
        const bool in = ok && e < hd;
        Ks[rr * LQ + e] = in ? kv_at<KV>(a.k_cache, base + e) : 0.0f;
        Vs[rr * HD + e] = in ? kv_at<KV>(a.v_cache, base + e) : 0.0f;
      }
      if (lane < 4) Ks[rr * LQ + HD + lane] = 0.0f;
      if (lane == 0) kval[rr] = ok ? 1.0f : 0.0f;
    }
    __syncthreads();

    // Scores of this warp's rows against cache row k0 + lane.
    float sc[kTileRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kTileRowsPerWarp; ++r) sc[r] = 0.0f;
#pragma unroll 2
    for (int e4 = 0; e4 < HD / 4; ++e4) {
      const float4 k = K4[lane * LQ4 + e4];
#pragma unroll
      for (int r = 0; r < kTileRowsPerWarp; ++r) {
        const float4 q = Q4[(warp + kTileWarps * r) * LQ4 + e4];
        sc[r] += q.x * k.x;
        sc[r] += q.y * k.y;
        sc[r] += q.z * k.z;
        sc[r] += q.w * k.w;
      }
    }
    const bool readable = kval[lane] != 0.0f;
    const int rpos = int(k0) + lane;
#pragma unroll
    for (int r = 0; r < kTileRowsPerWarp; ++r) {
      const int i = warp + kTileWarps * r;
      const float s = (readable && rpos <= pos[r]) ? sc[r] * a.scale : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(s));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing seen yet
      const float p = expf(s - m_use);
      const float corr = expf(m[r] - m_use);
      l[r] = l[r] * corr + warp_sum(p);
      m[r] = m_new;
      Ps[i * LP + lane] = p;
#pragma unroll
      for (int c = 0; c < V; ++c) o[r][c] *= corr;
    }
    __syncwarp();  // Ps rows of this warp's rows: written and read by this warp only
#pragma unroll 2
    for (int jj = 0; jj < kTileKv; ++jj) {
      float vv[V];
#pragma unroll
      for (int c = 0; c < V; ++c) vv[c] = Vs[jj * HD + lane + 32 * c];
#pragma unroll
      for (int r = 0; r < kTileRowsPerWarp; ++r) {
        const float p = Ps[(warp + kTileWarps * r) * LP + jj];
#pragma unroll
        for (int c = 0; c < V; ++c) o[r][c] += p * vv[c];
      }
    }
    __syncwarp();  // before the next step's Ps
  }
#pragma unroll
  for (int r = 0; r < kTileRowsPerWarp; ++r) {
    const int i = warp + kTileWarps * r;
    if (i >= rows) continue;
    float* orow = a.out + ((start + i0 + i) * a.Hq + hq) * hd;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int c = 0; c < V; ++c) {
      const int e = lane + 32 * c;
      if (e < hd) orow[e] = o[r][c] * inv;
    }
  }
}

// Prefill on the tensor cores, for head dims of 64, 128 and 256: block (tile of kMmaRows new rows
// of one sequence, query head), 8 warps of 16 rows each; the tiles of most rows (the last of a
// sequence, under the causal mask) are launched first. The tile's queries stay in shared memory;
// the cache rows it sees stream through shared memory kMmaKv at a time with cp.async. A warp's
// scores (16 x 32) and outputs (16 x hd) are mma.sync accumulators (m16n8k8 and m16n8k16 share
// their layout); the online softmax works on the score fragments (a row's values lie in the 4 lanes
// of a quad). Two kernels by precision; activations, caches and the softmax are fp32 in both:
// - attention_mma_kernel: 3xTF32 (cuda_mma_support.cuh), within 2^-19 of each product (fp32
//   products, the reference tests);
// - attention_bf16_kernel: with bf16 products (CudaOptions::bf16_matmul, as the other matrix
//   products) Q, K, V and the softmax's P are rounded to bf16 into m16n8k16, fp32 sums.
constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaRows = 16 * kMmaWarps;
constexpr int kMmaKv = 32;

// What a tensor-core block works on; ok is false where it has nothing to do (past its sequence's
// rows, or an inconsistent layout).
struct PrefillTile {
  const int32_t* table = nullptr;  // its sequence's block table
  bool ok = false;
  int b = 0, hq = 0, rows = 0, kvh = 0;
  int64_t start = 0, i0 = 0;  // the sequence's first row in the pass; the tile's first in the sequence
  int64_t first = 0;          // cache position of the sequence's first new row
  int64_t cap = 0, kv_end = 0;  // rows a table holds; the tile sees the cache rows [0, kv_end)
};

__device__ __forceinline__ PrefillTile prefill_tile(const AttentionArgs& a, int tiles_per_seq) {
  PrefillTile t;
  t.b = int(blockIdx.x) / tiles_per_seq;
  const int tile = tiles_per_seq - 1 - int(blockIdx.x) % tiles_per_seq;
  t.hq = int(blockIdx.y);
  if (t.b >= a.B) return t;
  t.start = a.cu[t.b];
  const int64_t n = int64_t(a.cu[t.b + 1]) - t.start;
  t.i0 = int64_t(tile) * kMmaRows;
  if (n < a.tile_min_rows || t.i0 >= n || t.start < 0 || t.start + n > a.T) return t;
  t.rows = int(n - t.i0 < kMmaRows ? n - t.i0 : kMmaRows);
  t.first = int64_t(a.kv_lens[t.b]) - n;
  t.cap = int64_t(a.W) * a.bs;
  t.kv_end = t.first + t.i0 + t.rows;
  t.kv_end = t.kv_end < 0 ? 0 : (t.kv_end > t.cap ? t.cap : t.kv_end);
  t.kvh = t.hq / (a.Hq / a.Hkv);
  t.table = table_of(a, t.b);
  t.ok = true;
  return t;
}

// The cache row (cache_slot) holding position k0 + lane of the tile's sequence (-1: unreadable).
__device__ __forceinline__ int prefill_row_slot(const AttentionArgs& a, const PrefillTile& t, int k0, int lane) {
  return cache_slot(a, t.table, int64_t(k0) + lane, t.kv_end);
}

// Where cache row k0 + lane of the tile's kv head starts in the caches (-1: unreadable).
template <int HD>
__device__ __forceinline__ int64_t prefill_row_base(const AttentionArgs& a, const PrefillTile& t, int k0, int lane) {
  const int slot = prefill_row_slot(a, t, k0, lane);
  return slot >= 0 ? int64_t(slot) * (int64_t(a.Hkv) * HD) + int64_t(t.kvh) * HD : -1;
}

// A step's K (or V) rows into shared memory (row stride ld elements), issued by the whole block as
// part of the open cp.async group; base: prefill_row_base of the step, in each lane. KV: the
// caches' elements, copied as they are (16 bytes: 4 floats or 8 bf16 a copy).
template <int HD, typename KV>
__device__ __forceinline__ void prefill_issue(int64_t base, KV* dst, int ld, const void* cache) {
  constexpr int EL = 16 / int(sizeof(KV)), CH = HD / EL;
  static_assert(kMmaKv * CH % kMmaThreads == 0, "every lane of a warp takes part (the shuffle)");
  const KV* c0 = static_cast<const KV*>(cache);
#pragma unroll
  for (int p = 0; p < kMmaKv * CH / kMmaThreads; ++p) {
    const int i = p * kMmaThreads + int(threadIdx.x), rr = i / CH, c = i % CH;
    const int64_t from = __shfl_sync(0xffffffffu, base, rr);
    cp_async16(dst + rr * ld + EL * c, c0 + (from < 0 ? 0 : from) + EL * c, from >= 0);
  }
}

// Four consecutive elements (c of each row's HD / 4) of the tile's query row r; zeros past its rows.
template <int HD>
__device__ __forceinline__ float4 prefill_q(const AttentionArgs& a, const PrefillTile& t, int r, int c) {
  return r < t.rows ? load4_after_wait(a.q + ((t.start + t.i0 + r) * a.Hq + t.hq) * HD + 4 * c)
                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

// Cache positions in 32 bits (kv_end <= W bs <= INT32_MAX): tile row r sees the cache rows [0, p];
// -1: none (past the tile, or before the cache in an inconsistent layout).
__device__ __forceinline__ int prefill_position(const PrefillTile& t, int r) {
  const int64_t p = t.first + t.i0 + r;
  return r < t.rows ? int(p < -1 ? -1 : (p > t.cap ? t.cap : p)) : -1;
}

// 2^x in one instruction (ex2.approx.ftz: 2^-22 relative; results below 2^-126 are 0, as a
// softmax weight that small is anyway).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The largest (kMax) or the sum of v[0 .. N) in a tree: log2 N dependent steps, not N - 1.
template <bool kMax, int N>
__device__ __forceinline__ float tree_reduce(float (&v)[N]) {
  static_assert((N & (N - 1)) == 0, "a power of two");
#pragma unroll
  for (int w = N / 2; w > 0; w /= 2)
#pragma unroll
    for (int i = 0; i < w; ++i) v[i] = kMax ? fmaxf(v[i], v[i + w]) : v[i] + v[i + w];
  return v[0];
}

// The online softmax of a warp's two rows (pos: their positions) over a step's scores s: the mask
// (causal; ok: the step's cache rows are readable), new maxima m (in scaled units), the
// unnormalised P in s, the sums l; corr: what the outputs must be multiplied by (the old maximum's
// weight against the new one). kExp2: the scale includes log2 e, so P = 2^(s scale - m), one fma
// and one ex2 an element (expf takes several). unmasked: every cache row of the step is readable
// and at or before both rows' positions (the mask is skipped).
template <bool kExp2, int ST>
__device__ __forceinline__ void prefill_scores(float (&s)[ST][4], float (&m)[2], float (&l)[2], float (&corr)[2],
                                               const bool* ok, bool unmasked, const int (&pos)[2], int k0, float scale,
                                               int t4) {
  const auto ex = [](float x) { return kExp2 ? exp2_approx(x) : expf(x); };
  if (!unmasked) {
#pragma unroll
    for (int j = 0; j < ST; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kr = 8 * j + 2 * t4 + (e & 1);
        if (!(ok[kr] && k0 + kr <= pos[e / 2])) s[j][e] = -INFINITY;
      }
  }
  float m_use[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float v[ST];
#pragma unroll
    for (int j = 0; j < ST; ++j) v[j] = fmaxf(s[j][2 * h], s[j][2 * h + 1]);
    float mx = tree_reduce<true>(v);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[h], mx * scale);  // (scale > 0: the largest score scaled is the largest scaled)
    m_use[h] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing seen yet
    corr[h] = ex(m[h] - m_use[h]);
    m[h] = m_new;
  }
#pragma unroll
  for (int j = 0; j < ST; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      s[j][e] = kExp2 ? ex(fmaf(s[j][e], scale, -m_use[e / 2])) : ex(s[j][e] * scale - m_use[e / 2]);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float v[ST];
#pragma unroll
    for (int j = 0; j < ST; ++j) v[j] = s[j][2 * h] + s[j][2 * h + 1];
    float sum = tree_reduce<false>(v);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    l[h] = l[h] * corr[h] + sum;
  }
}

template <int NT>
__device__ __forceinline__ void prefill_rescale(float (&o)[NT][4], const float (&corr)[2]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] *= corr[0], o[j][1] *= corr[0], o[j][2] *= corr[1], o[j][3] *= corr[1];
}

// prefill_scores, then the outputs rescaled (the mma.sync tiles: their P V follows at once).
template <int ST, int NT>
__device__ __forceinline__ void prefill_softmax(float (&s)[ST][4], float (&m)[2], float (&l)[2], float (&o)[NT][4],
                                                const bool* ok, const int (&pos)[2], int k0, float scale, int t4) {
  float corr[2];
  prefill_scores<false>(s, m, l, corr, ok, false, pos, k0, scale, t4);
  prefill_rescale(o, corr);
}

// The warp's rows r0, r0 + 8 of the tile: o / l into the output.
template <int HD, int NT>
__device__ __forceinline__ void prefill_store(const AttentionArgs& a, const PrefillTile& t, int r0, int t4,
                                              const float (&o)[NT][4], const float (&l)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (r0 + 8 * h >= t.rows) continue;
    float* orow = a.out + ((t.start + t.i0 + r0 + 8 * h) * a.Hq + t.hq) * HD + 2 * t4;
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
#pragma unroll
    for (int c = 0; c < NT; ++c)
      *reinterpret_cast<float2*>(orow + 8 * c) = make_float2(o[c][2 * h] * inv, o[c][2 * h + 1] * inv);
  }
}

// 3xTF32. The next step's K loads while this step's P V is computed, its V while its scores are.
// Operand order: the order of k within an 8-wide mma step is free if both operands follow it. Q K^T
// gives lane t the head-dim elements 4t .. 4t + 3 of a 16-wide block (one 16-byte load each of Q
// and K; the first mma takes 4t, 4t + 1 as k = t, t + 4, the second 4t + 2, 4t + 3). P V reads the
// scores' accumulator as its A operand: key 2t and 2t + 1 of an 8-key block as k = t and t + 4,
// and V's rows in the same order, so no shuffle is needed.
// Shared memory, in floats: Qs [kMmaRows][HD + 16] and Ks [kMmaKv][HD + 16] (16-byte fragment
// loads: a row stride of 16 mod 32 banks puts a quarter warp's 8 loads on 32 banks), Vs
// [kMmaKv][HD + 4] (4-byte loads of rows 2t, 2t + 1 at column g: 4 mod 32).
__host__ __device__ constexpr int mma_smem_floats(int HD) { return (kMmaRows + kMmaKv) * (HD + 16) + kMmaKv * (HD + 4); }

template <int HD>
__global__ void __launch_bounds__(kMmaThreads, 1) attention_mma_kernel(const AttentionArgs a, int tiles_per_seq) {
  wait_for_prior_kernels();
  constexpr int LQ = HD + 16, LV = HD + 4, C4 = HD / 4, NT = HD / 8, ST = kMmaKv / 8;
  extern __shared__ float4 smem_f4[];
  float* Qs = reinterpret_cast<float*>(smem_f4);
  float* Ks = Qs + kMmaRows * LQ;
  float* Vs = Ks + kMmaKv * LQ;
  __shared__ bool kok[2][kMmaKv];  // the cache rows of a step (even, odd) are readable

  const PrefillTile tl = prefill_tile(a, tiles_per_seq);
  if (!tl.ok) return;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t4 = lane % 4;
  const int kv_end = int(tl.kv_end);
  int64_t base = kv_end > 0 ? prefill_row_base<HD>(a, tl, 0, lane) : -1;  // of the step in flight
  if (kv_end > 0) {
    if (warp == 0) kok[0][lane] = base >= 0;
    prefill_issue<HD>(base, Ks, LQ, a.k_cache);
    cp_async_commit();
    prefill_issue<HD>(base, Vs, LV, a.v_cache);
    cp_async_commit();
  }
  for (int i = int(threadIdx.x); i < kMmaRows * C4; i += kMmaThreads) {
    const int r = i / C4, c = i % C4;
    *reinterpret_cast<float4*>(Qs + r * LQ + 4 * c) = prefill_q<HD>(a, tl, r, c);
  }
  const int r0 = warp * 16 + g;  // this lane's rows: r0 and r0 + 8 of the tile
  const int pos[2] = {prefill_position(tl, r0), prefill_position(tl, r0 + 8)};
  // A warp skips the products (but still loads and syncs) where its rows see none of the step's
  // cache rows: past the tile, or the step past its last row (uniform over the warp: mma.sync).
  const int warp_last =
      warp * 16 < tl.rows ? prefill_position(tl, tl.rows - 1 < warp * 16 + 15 ? tl.rows - 1 : warp * 16 + 15) : -1;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  const float* qa = Qs + r0 * LQ + 4 * t4;   // Q rows g, g + 8 at 4t .. 4t + 3 of each 16
  const float* ka = Ks + g * LQ + 4 * t4;    // K rows 8 j + g likewise
  const float* va = Vs + 2 * t4 * LV + g;    // V rows 8 j + 2t, + 1 at column 8 c + g

  for (int k0 = 0; k0 < kv_end; k0 += kMmaKv) {
    const bool more = k0 + kMmaKv < kv_end;
    base = more ? prefill_row_base<HD>(a, tl, k0 + kMmaKv, lane) : -1;  // the next step's, looked up now
    cp_async_wait_all_but_last();  // this step's K (its V may still be in flight)
    __syncthreads();               // ... for every thread's part (and, the first time, Qs)
    const bool* ok = kok[(k0 / kMmaKv) & 1];
    const bool active = k0 <= warp_last;
    float s[ST][4];  // s[j]: keys k0 + 8 j + 2t, + 1 of rows g (s[j][0..1]) and g + 8 (s[j][2..3])
    if (active) {
      // The big products and the small ones in separate accumulators: twice the chains of
      // dependent mma a warp has in flight (4 key blocks alone left the tensor cores waiting).
      float lo[ST][4];
#pragma unroll
      for (int j = 0; j < ST; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = lo[j][e] = 0.0f;
#pragma unroll 2
      for (int kk = 0; kk < HD; kk += 16) {
        const float4 x0 = *reinterpret_cast<const float4*>(qa + kk);
        const float4 x1 = *reinterpret_cast<const float4*>(qa + 8 * LQ + kk);
        const Tf32Pair qf0[4] = {tf32_split(x0.x), tf32_split(x1.x), tf32_split(x0.y), tf32_split(x1.y)};
        const Tf32Pair qf1[4] = {tf32_split(x0.z), tf32_split(x1.z), tf32_split(x0.w), tf32_split(x1.w)};
#pragma unroll
        for (int j = 0; j < ST; ++j) {
          const float4 y = *reinterpret_cast<const float4*>(ka + 8 * j * LQ + kk);
          const Tf32Pair kf0[2] = {tf32_split(y.x), tf32_split(y.y)};
          const Tf32Pair kf1[2] = {tf32_split(y.z), tf32_split(y.w)};
          mma_3xtf32_split(s[j], lo[j], qf0, kf0);
          mma_3xtf32_split(s[j], lo[j], qf1, kf1);
        }
      }
#pragma unroll
      for (int j = 0; j < ST; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] += lo[j][e];
    }
    __syncthreads();  // every warp is done with this step's K
    if (more) {
      if (warp == 0) kok[(k0 / kMmaKv + 1) & 1][lane] = base >= 0;
      prefill_issue<HD>(base, Ks, LQ, a.k_cache);
    }
    cp_async_commit();  // (empty at the last step: keeps the count of groups in flight)

    if (active) prefill_softmax(s, m, l, o, ok, pos, k0, a.scale, t4);

    cp_async_wait_all_but_last();  // this step's V (the next step's K may still be in flight)
    __syncthreads();
    if (active) {
#pragma unroll
      for (int j = 0; j < ST; ++j) {
        const Tf32Pair pf[4] = {tf32_split(s[j][0]), tf32_split(s[j][2]), tf32_split(s[j][1]), tf32_split(s[j][3])};
#pragma unroll
        for (int c = 0; c < NT; ++c) {
          const Tf32Pair vf[2] = {tf32_split(va[8 * j * LV + 8 * c]), tf32_split(va[(8 * j + 1) * LV + 8 * c])};
          mma_3xtf32(o[c], pf, vf);
        }
      }
    }
    __syncthreads();  // every warp is done with this step's V
    if (more) prefill_issue<HD>(base, Vs, LV, a.v_cache);
    cp_async_commit();
  }
  prefill_store<HD>(a, tl, r0, t4, o, l);
}

// bf16 products. fp32 caches: the step's K and V arrive as fp32 by cp.async while the previous step
// computes, and are converted once into bf16 tiles. bf16 caches (CudaBackend::kv_cache_dtype under
// bf16 products): the step's rows are copied into the bf16 tiles as they lie, two sets of tiles in
// turn, so the next step's copies run during this step's products and a step is one barrier (half
// the bytes, no conversion pass). Every warp reads the tiles with ldmatrix (x4: four 8 x 8
// matrices, a whole A fragment or two B fragments an instruction; .trans for V, whose rows are the
// products' k). Q is converted once a tile.
// Shared memory, in bytes: fp32 caches: Kf, Vf [kMmaKv][HD] fp32, Qb [kMmaRows][HD + 8], Kb, Vb
// [kMmaKv][HD + 8] bf16; bf16 caches: Qb, then Kb and Vb twice (a row stride of 16 bytes mod 128
// puts ldmatrix's 8 row reads of a matrix on 32 banks).
__host__ __device__ constexpr int bf16_smem_bytes(int HD, bool bf16_cache) {
  return bf16_cache ? (kMmaRows + 4 * kMmaKv) * (HD + 8) * 2
                    : 2 * kMmaKv * HD * 4 + (kMmaRows + 2 * kMmaKv) * (HD + 8) * 2;
}

// rows x HD floats (row stride lf) to bf16 (row stride lb), by the whole block.
template <int HD>
__device__ __forceinline__ void to_bf16_rows(const float* f, int lf, __nv_bfloat16* b, int lb, int rows) {
  constexpr int C4 = HD / 4;
  for (int i = int(threadIdx.x); i < rows * C4; i += kMmaThreads) {
    const int r = i / C4, c = i % C4;
    const float4 v = *reinterpret_cast<const float4*>(f + r * lf + 4 * c);
    *reinterpret_cast<uint2*>(b + r * lb + 4 * c) = make_uint2(bf16_pair(v.x, v.y), bf16_pair(v.z, v.w));
  }
}

template <int HD, typename KV>
__global__ void __launch_bounds__(kMmaThreads, 1) attention_bf16_kernel(const AttentionArgs a, int tiles_per_seq) {
  wait_for_prior_kernels();
  constexpr bool kDirect = std::is_same_v<KV, __nv_bfloat16>;  // bf16 caches: no fp32 staging
  constexpr int LB = HD + 8, C4 = HD / 4, NT = HD / 8, ST = kMmaKv / 8, kSets = kDirect ? 2 : 1;
  extern __shared__ float4 smem_f4[];
  float* Kf = reinterpret_cast<float*>(smem_f4);  // (fp32 caches only)
  float* Vf = Kf + (kDirect ? 0 : kMmaKv * HD);
  __nv_bfloat16* Qb = reinterpret_cast<__nv_bfloat16*>(Vf + (kDirect ? 0 : kMmaKv * HD));
  __nv_bfloat16* Kb = Qb + kMmaRows * LB;  // set i at + i * kMmaKv * LB
  __nv_bfloat16* Vb = Kb + kSets * kMmaKv * LB;
  __shared__ bool kok[2][kMmaKv];  // the cache rows of a step (even, odd) are readable

  const PrefillTile tl = prefill_tile(a, tiles_per_seq);
  if (!tl.ok) return;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, t4 = lane % 4;
  const int kv_end = int(tl.kv_end);
  int64_t base = kv_end > 0 ? prefill_row_base<HD>(a, tl, 0, lane) : -1;  // of the step in flight
  if (kv_end > 0) {
    if constexpr (kDirect) {
      if (warp == 0) kok[0][lane] = base >= 0;
      prefill_issue<HD>(base, Kb, LB, a.k_cache);
      prefill_issue<HD>(base, Vb, LB, a.v_cache);
    } else {
      prefill_issue<HD>(base, Kf, HD, a.k_cache);
      prefill_issue<HD>(base, Vf, HD, a.v_cache);
    }
  }
  cp_async_commit();
  for (int i = int(threadIdx.x); i < kMmaRows * C4; i += kMmaThreads) {
    const int r = i / C4, c = i % C4;
    const float4 v = prefill_q<HD>(a, tl, r, c);
    *reinterpret_cast<uint2*>(Qb + r * LB + 4 * c) = make_uint2(bf16_pair(v.x, v.y), bf16_pair(v.z, v.w));
  }
  const int r0 = warp * 16 + lane / 4;  // this lane's rows: r0 and r0 + 8 of the tile
  const int pos[2] = {prefill_position(tl, r0), prefill_position(tl, r0 + 8)};
  const int warp_last =
      warp * 16 < tl.rows ? prefill_position(tl, tl.rows - 1 < warp * 16 + 15 ? tl.rows - 1 : warp * 16 + 15) : -1;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  // ldmatrix row addresses of this lane (lane / 8 picks the matrix of the four): Q, rows 0-15 of
  // the warp at k + 0 / + 8 (a0 .. a3); K, keys 0-7 at k + 0 / + 8, then keys 8-15 (b0, b1 of two
  // key blocks); V, keys 0-7 / 8-15 at columns + 0, then at + 8 (b0, b1 of two column blocks).
  const __nv_bfloat16* qa = Qb + (warp * 16 + lane % 16) * LB + 8 * (lane / 16);
  const __nv_bfloat16* ka0 = Kb + (8 * (lane / 16) + lane % 8) * LB + 8 * ((lane / 8) % 2);
  const __nv_bfloat16* va0 = Vb + (8 * ((lane / 8) % 2) + lane % 8) * LB + 8 * (lane / 16);

  for (int k0 = 0; k0 < kv_end; k0 += kMmaKv) {
    const int step = k0 / kMmaKv, set = kDirect ? step & 1 : 0;
    const bool more = k0 + kMmaKv < kv_end;
    const bool readable = base >= 0;
    base = more ? prefill_row_base<HD>(a, tl, k0 + kMmaKv, lane) : -1;  // the next step's, looked up now
    cp_async_wait_all();
    __syncthreads();  // the step's K, V are the block's; every warp is done with the last step's tiles
    if constexpr (kDirect) {
      if (more) {  // into the other set, which the last step read
        if (warp == 0) kok[(step + 1) & 1][lane] = base >= 0;
        prefill_issue<HD>(base, Kb + (set ^ 1) * kMmaKv * LB, LB, a.k_cache);
        prefill_issue<HD>(base, Vb + (set ^ 1) * kMmaKv * LB, LB, a.v_cache);
      }
    } else {
      to_bf16_rows<HD>(Kf, HD, Kb, LB, kMmaKv);
      to_bf16_rows<HD>(Vf, HD, Vb, LB, kMmaKv);
      if (warp == 0) kok[0][lane] = readable;
      __syncthreads();
      if (more) {
        prefill_issue<HD>(base, Kf, HD, a.k_cache);
        prefill_issue<HD>(base, Vf, HD, a.v_cache);
      }
    }
    cp_async_commit();
    if (k0 > warp_last) continue;  // none of the warp's rows sees the step (uniform: mma.sync)
    const __nv_bfloat16* ka = ka0 + set * kMmaKv * LB;
    const __nv_bfloat16* va = va0 + set * kMmaKv * LB;

    float s[ST][4];  // s[j]: keys k0 + 8 j + 2t, + 1 of rows g (s[j][0..1]) and g + 8 (s[j][2..3])
#pragma unroll
    for (int j = 0; j < ST; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll 4
    for (int kk = 0; kk < HD; kk += 16) {
      uint32_t qf[4];
      ldmatrix_x4(qf, qa + kk);
#pragma unroll
      for (int j = 0; j < ST; j += 2) {
        uint32_t kf[4];
        ldmatrix_x4(kf, ka + 8 * j * LB + kk);
        mma_bf16(s[j], qf, kf[0], kf[1]);
        mma_bf16(s[j + 1], qf, kf[2], kf[3]);
      }
    }
    prefill_softmax(s, m, l, o, kok[kDirect ? step & 1 : 0], pos, k0, a.scale, t4);
#pragma unroll
    for (int j = 0; j < ST; j += 2) {
      uint32_t pf[4];
      accumulators_as_a(s, j, pf);
#pragma unroll
      for (int c = 0; c < NT; c += 2) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, va + 8 * j * LB + 8 * c);
        mma_bf16(o[c], pf, vf[0], vf[1]);
        mma_bf16(o[c + 1], pf, vf[2], vf[3]);
      }
    }
  }
  prefill_store<HD>(a, tl, r0, t4, o, l);
}

// Prefill over bf16 caches on Hopper's warpgroup products (sm_90a; the mma.sync tiles above ran at
// ~160 TFLOP/s, a fifth of the bf16 rate, docs/perf.md). The block's two warpgroups take 64 of the
// tile's kMmaRows rows each; the cache rows stream through shared memory kWgKv a step. A
// warpgroup's scores S = Q K^T are m64n64k16 products of Q and K from shared memory (both K-major:
// rows of head-dim elements), its outputs O += P V m64n64k16 products of P from registers (the
// scores' accumulators rounded to bf16 as they lie: wgmma's A fragment of a warp's 16 rows is
// mma.sync's) and V from shared memory, MN-major (rows of keys, the head dims along them): no
// transposition. The accumulators' layout is the mma.sync tiles', so the store is theirs.
// Pipelined as FlashAttention-3 within a warpgroup: step j + 1's scores are issued before step j's
// P V, and their softmax runs while P V is in the tensor cores (the outputs are rescaled once it is
// done). K runs three steps ahead and V two, in two sets each: a step's K set is free once its
// scores are done, its V set once its P V is, so one barrier a step (after both) hands both sets
// back, and the copies issued there have a whole step to land.
// Shared tiles: 128-byte-swizzled column blocks of 64 head dims (cuda_wgmma_support.cuh), Q's
// [kMmaRows][64], each K and V set's [kWgKv][64].
constexpr int kWgKv = 64;  // cache rows a step: the n of the score products

__host__ __device__ constexpr int wgmma_smem_bytes(int HD) { return 1024 + (kMmaRows + 4 * kWgKv) * HD * 2; }

// The cache rows (prefill_row_slot) of positions k0 + lane and k0 + 32 + lane, looked up an
// iteration before they are copied (wgmma_issue hands them to the lanes that copy).
__device__ __forceinline__ void wgmma_row_slots(const AttentionArgs& a, const PrefillTile& t, int k0, int lane,
                                                int (&slot)[2]) {
  static_assert(kWgKv == 64, "two rows a lane");
  slot[0] = prefill_row_slot(a, t, k0, lane);
  slot[1] = prefill_row_slot(a, t, k0 + 32, lane);
}

// A step's K or V rows (slot: wgmma_row_slots of the step, in each lane) of KV head kvh into a set's
// swizzled tile (dst: its shared address), issued by the whole block as part of the open cp.async
// group; unreadable rows are zeros. kFlags (K): ok[r] says the step's cache row r is readable,
// *all_ok that all are.
// Thread t copies chunk c = t % CH of rows t / CH + p (kMmaThreads / CH): its chunk's swizzled
// place in a row is the same in every pass (the rows a pass advances by are a multiple of 8), so a
// pass is a shuffle, one multiply-add for the address and the copy.
template <int HD, bool kFlags = false>
__device__ __forceinline__ void wgmma_issue(const AttentionArgs& a, const int (&slot)[2], int kvh, uint32_t dst,
                                            const void* cache, bool* ok = nullptr, bool* all_ok = nullptr) {
  constexpr int CH = HD / 8, kRowsAPass = kMmaThreads / CH, kPasses = kWgKv / kRowsAPass;
  static_assert(kMmaThreads % CH == 0 && kRowsAPass % 8 == 0 && kWgKv % kRowsAPass == 0, "whole rows a pass");
  const int r0 = int(threadIdx.x) / CH, c = int(threadIdx.x) % CH;
  const uint32_t d0 = dst + uint32_t(c / 8) * (kWgKv * 128) + swizzled128(r0, c % 8);
  const unsigned char* s0 = static_cast<const unsigned char*>(cache) + (int64_t(kvh) * HD + 8 * c) * 2;
  const uint32_t row_bytes = uint32_t(a.Hkv) * HD * 2;  // (<= 65535 x 512: checked on the host)
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int r = r0 + p * kRowsAPass;  // (passes [0, kPasses / 2) take rows 0 - 31: slot[0])
    const int from = __shfl_sync(0xffffffffu, p < kPasses / 2 ? slot[0] : slot[1], r % 32);
    if (kFlags && c == 0) ok[r] = from >= 0;
    cp_async16(d0 + p * kRowsAPass * 128, s0 + uint64_t(uint32_t(from < 0 ? 0 : from)) * row_bytes, from >= 0);
  }
  if (kFlags) {
    const bool all = __all_sync(0xffffffffu, slot[0] >= 0 && slot[1] >= 0);  // (every warp holds the same rows)
    if (threadIdx.x == 0) *all_ok = all;
  }
}

template <int HD>
__global__ void __launch_bounds__(kMmaThreads, 1) attention_wgmma_kernel(const AttentionArgs a, int tiles_per_seq) {
  wait_for_prior_kernels();
  constexpr int NB = HD / 64, NT = HD / 8, ST = kWgKv / 8;
  constexpr uint32_t kQBytes = kMmaRows * HD * 2, kSetBytes = kWgKv * HD * 2;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = unsigned(__cvta_generic_to_shared(smem_raw));
  unsigned char* Qs = smem_raw + (((raw + 1023) & ~1023u) - raw);
  const uint32_t q_addr = unsigned(__cvta_generic_to_shared(Qs));
  const uint32_t k_addr = q_addr + kQBytes, v_addr = k_addr + 2 * kSetBytes;  // set i at + i * kSetBytes
  __shared__ bool kok[2][kWgKv];  // step s's cache rows are readable: kok[s % 2]
  __shared__ bool kall[2];        // ... all of them

  const PrefillTile tl = prefill_tile(a, tiles_per_seq);
  if (!tl.ok) return;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, t4 = lane % 4;
  // (from a shuffle: the compiler then knows it is the warp's alike, so the products it guards are
  // not in a divergent path, where it would serialize them)
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);
  const int kv_end = int(tl.kv_end), steps = (kv_end + kWgKv - 1) / kWgKv;
  int bv[2], bk[2];  // the cache rows of the next V and the next K to issue
  // Steps 0 and 1's K, step 0's V (then hand_over(-1) issues step 1's V and step 2's K).
  wgmma_row_slots(a, tl, 0, lane, bk);
  if (steps > 0) {
    wgmma_issue<HD, true>(a, bk, tl.kvh, k_addr, a.k_cache, kok[0], &kall[0]);
    wgmma_issue<HD>(a, bk, tl.kvh, v_addr, a.v_cache);
  }
  wgmma_row_slots(a, tl, kWgKv, lane, bv);
  if (steps > 1) wgmma_issue<HD, true>(a, bv, tl.kvh, k_addr + kSetBytes, a.k_cache, kok[1], &kall[1]);
  cp_async_commit();
  wgmma_row_slots(a, tl, 2 * kWgKv, lane, bk);
  for (int i = int(threadIdx.x); i < kMmaRows * (HD / 4); i += kMmaThreads) {
    const int r = i / (HD / 4), c = i % (HD / 4);
    const float4 v = prefill_q<HD>(a, tl, r, c);
    *reinterpret_cast<uint2*>(Qs + (c / 16) * (kMmaRows * 128) + swizzled128(r, (c % 16) / 2) + 8 * (c % 2)) =
        make_uint2(bf16_pair(v.x, v.y), bf16_pair(v.z, v.w));
  }
  const int r0 = warp * 16 + lane / 4;  // this lane's rows: r0 and r0 + 8 of the tile
  const int pos[2] = {prefill_position(tl, r0), prefill_position(tl, r0 + 8)};
  const int pos_min = pos[0] < pos[1] ? pos[0] : pos[1];
  const int wg_last = 64 * wg < tl.rows ? prefill_position(tl, tl.rows - 1 < 64 * wg + 63 ? tl.rows - 1 : 64 * wg + 63)
                                        : -1;
  const float scale = a.scale * 1.4426950408889634f;  // scores in log2 units (prefill_scores<true>)
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, corr[2];
  float o[NB][32];  // column block n: o[n][4 j + e] as o_tiles[8 n + j][e] of prefill_store
#pragma unroll
  for (int n = 0; n < NB; ++n)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[n][i] = 0.0f;
  float sc[32] = {};                         // a step's scores, then its P
  uint32_t pf[kWgKv / 16][4];                // P of the step whose P V is next, as A fragments
  const uint32_t q_rows = q_addr + uint32_t(wg) * 64 * 128;  // the warpgroup's 64 rows of each column block

  // Descriptors' low words (cuda_wgmma_support.cuh): a slice's is the tile's plus its offset / 16.
  const uint32_t q_desc = sw128_kmajor_desc_lo(q_rows);
  // The scores of step s into sc (issued and committed; the caller waits).
  const auto issue_scores = [&](int s) {
    const uint32_t k_desc = sw128_kmajor_desc_lo(k_addr + uint32_t(s & 1) * kSetBytes);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < HD / 16; ++kb) {
      const uint32_t koff = uint32_t(kb % 4) * 32;  // the k16 step inside its 128-byte row
      wgmma_bf16_ss(sc, q_desc + ((uint32_t(kb / 4) * (kMmaRows * 128) + koff) >> 4),
                    k_desc + ((uint32_t(kb / 4) * (kWgKv * 128) + koff) >> 4), kb > 0);
    }
    wgmma_commit();
  };
  // Step s's softmax on its scores (waited for): corr, and P in sc.
  const auto softmax = [&](int s) {
    fence_accumulators(sc);
    const int k0 = s * kWgKv;
    auto& sv = reinterpret_cast<float(&)[ST][4]>(sc);
    prefill_scores<true>(sv, m, l, corr, kok[s & 1], kall[s & 1] && k0 + kWgKv - 1 <= pos_min, pos, k0, scale, t4);
  };
  const auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kWgKv / 16; ++kk) accumulators_as_a(reinterpret_cast<const float(&)[ST][4]>(sc), 2 * kk, pf[kk]);
  };
  // The block's copies landed (and the Q tile written), to the tensor cores of both warpgroups.
  const auto land = []() {
    cp_async_wait_all();
    fence_async_shared();
    __syncthreads();
  };
  // After step j's products: both warpgroups are done with the sets that step j + 2's V and step
  // j + 3's K go to.
  const auto hand_over = [&](int j) {
    land();
    if (j + 2 < steps) wgmma_issue<HD>(a, bv, tl.kvh, v_addr + uint32_t(j & 1) * kSetBytes, a.v_cache);
    if (j + 3 < steps)
      wgmma_issue<HD, true>(a, bk, tl.kvh, k_addr + uint32_t((j + 1) & 1) * kSetBytes, a.k_cache, kok[(j + 1) & 1],
                            &kall[(j + 1) & 1]);
    cp_async_commit();
#pragma unroll
    for (int h = 0; h < 2; ++h) bv[h] = bk[h];
    if (j + 4 < steps) wgmma_row_slots(a, tl, (j + 4) * kWgKv, lane, bk);  // in flight meanwhile
  };

  land();
  if (steps > 0 && 0 <= wg_last) {
    issue_scores(0);
    wgmma_wait<0>();
    softmax(0);
    pack_p();
  }
  // P V of step j (the caller commits and waits).
  const auto issue_pv = [&](int j) {
    const uint32_t v_desc = sw128_mnmajor_desc_lo(v_addr + uint32_t(j & 1) * kSetBytes, kWgKv * 128);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kWgKv / 16; ++kk)
#pragma unroll
      for (int n = 0; n < NB; ++n)
        wgmma_bf16_rs_mn(o[n], pf[kk], v_desc + ((uint32_t(n) * (kWgKv * 128) + uint32_t(kk) * 16 * 128) >> 4));
    wgmma_commit();
  };
  const auto outputs_done = [&]() {
#pragma unroll
    for (int n = 0; n < NB; ++n) fence_accumulators(o[n]);
  };
  hand_over(-1);
  // The steps the warpgroup's rows see: 0 .. seen - 1 (uniform in the warpgroup: each branch below
  // holds whole products, from their fence to their wait, which the compiler needs to overlap them).
  const int seen = wg_last < 0 ? 0 : (wg_last / kWgKv + 1 < steps ? wg_last / kWgKv + 1 : steps);
  for (int j = 0; j < steps; ++j) {
    if (j + 1 < seen) {
      issue_scores(j + 1);
      issue_pv(j);
      wgmma_wait<1>();  // the scores (P V may still run)
      softmax(j + 1);
      wgmma_wait<0>();
      outputs_done();
      if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f))  // (a new maximum in one of the warp's rows)
        prefill_rescale(reinterpret_cast<float(&)[NT][4]>(o), corr);
      pack_p();
    } else if (j < seen) {
      issue_pv(j);
      wgmma_wait<0>();
      outputs_done();
    }
    hand_over(j);
  }
  prefill_store<HD>(a, tl, r0, t4, reinterpret_cast<const float(&)[NT][4]>(o), l);
}

// Merges the splits of block (row, head): out = sum_s e^{m_s - M} o_s / sum_s e^{m_s - M} l_s. Rows
// of the tiled kernel's sequences have no splits (and their output is written). The first warp
// finds M, the weights e^{m_s - M} and 1 / L (a split a lane: splits <= 32) into shared memory; then
// each thread adds its elements' partials, their loads independent of one another (a thread that
// walked the splits for M and L itself, and again for each element, took 18 us a layer at batch 1).
__global__ void __launch_bounds__(kAttnThreads) attention_merge_kernel(const AttentionArgs a) {
  static_assert(kMaxSplits <= 32, "a split a lane");
  wait_for_prior_kernels();
  __shared__ float wsplit[kMaxSplits], inv_l;
  const int t = int(blockIdx.x);
  const int b = sequence_of(a.cu, a.B, t);
  if (int64_t(a.cu[b + 1]) - a.cu[b] >= a.tile_min_rows) return;
  const int64_t item = int64_t(t) * a.Hq + blockIdx.y;
  const int splits = a.splits, hd = a.hd;
  if (threadIdx.x < 32) {
    const int s = int(threadIdx.x);
    const float* ml = a.part_ml + (item * splits + s) * 2;
    const float ms = s < splits ? ml[0] : -INFINITY, ls = s < splits ? ml[1] : 0.0f;
    const float M = warp_max(ms);
    const float w = ms == -INFINITY ? 0.0f : expf(ms - M);
    const float L = warp_sum(ls * w);
    if (s < splits) wsplit[s] = w;
    if (s == 0) inv_l = L > 0.0f ? 1.0f / L : 0.0f;
  }
  __syncthreads();
  const float* part = a.part + item * splits * hd;
  for (int e = int(threadIdx.x); e < hd; e += blockDim.x) {
    float o = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) o += part[int64_t(s) * hd + e] * wsplit[s];
    const float y = o * inv_l;
    a.out[item * hd + e] = a.qg ? y * sigmoidf_(load_after_wait(a.qg + item * 2 * hd + hd + e)) : y;
  }
}

}  // namespace

void CudaOps::attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache, Tensor& v_cache,
                        const SeqLayout& layout, Tensor& out) {
  attention_with(q, k_new, v_new, k_cache, v_cache, layout, out, nullptr);
}

// One new row a sequence (decode, draft passes): the rows kernel norms and rotates its q heads and
// the new K itself, reads the new row from shared memory and writes it to the caches, and the
// gate multiplies where the outputs are stored (its merge, with splits): three kernels fewer an
// attention layer (qk_norm_rope, the cache write, mul_sigmoid). Other passes, rotations past
// kGatedMaxHalf pairs, or BALLAST_CUDA_GATED_ATTENTION=0 (for A/B runs): the three ops.
void CudaOps::gated_attention(const Tensor& qg, const QkNormRope& r, Tensor& q, Tensor& gate, Tensor& k,
                              const Tensor& v, Tensor& k_cache, Tensor& v_cache, const SeqLayout& layout,
                              Tensor& out) {
  static const bool fused = switched_on("BALLAST_CUDA_GATED_ATTENTION");
  if (!fused || layout.max_query_len != 1 || r.rot / 2 > kGatedMaxHalf)
    return Ops::gated_attention(qg, r, q, gate, k, v, k_cache, v_cache, layout, out);
  check_qk_norm_rope(qg, r.q_norm, r.k_norm, r.positions, r.rot, q, gate, k);
  expect_device("gated_attention", "qg", qg);
  expect_device("gated_attention", "q_norm", r.q_norm);
  expect_device("gated_attention", "k_norm", r.k_norm);
  expect_device("gated_attention", "positions", r.positions);
  const GatedInputs gated{qg, r};
  attention_with(q, k, v, k_cache, v_cache, layout, out, &gated);
}

void CudaOps::attention_with(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache,
                             Tensor& v_cache, const SeqLayout& layout, Tensor& out, const GatedInputs* gated) {
  auto timed = time_op(gated                     ? "attention decode (q and k normed and rotated, gated)"
                       : layout.max_query_len > 1 ? "attention prefill"
                                                  : "attention decode");
  const AttentionShape shape = check_attention(q, k_new, v_new, k_cache, v_cache, layout, out);
  expect_device("attention", "q", q);
  expect_device("attention", "k_new", k_new);
  expect_device("attention", "v_new", v_new);
  expect_device("attention", "k_cache", k_cache);
  expect_device("attention", "v_cache", v_cache);
  expect_device("attention", "out", out);
  const int B = shape.B;
  if (B == 0) return;
  const int64_t T = shape.T, Hq = shape.Hq, hd = shape.hd, Hkv = shape.Hkv;
  const int64_t blocks = shape.blocks, bs = shape.block_size, W = shape.W;
  expect_device("attention", "cu_seqlens", layout.cu_seqlens);
  expect_device("attention", "kv_lens", layout.kv_lens);
  expect_device("attention", "slot_mapping", layout.slot_mapping);
  expect_device("attention", "block_tables", layout.block_tables);
  if (layout.table_rows.defined()) expect_device("attention", "table_rows", layout.table_rows);
  // What these kernels can launch and index (32-bit rows and table entries).
  check(hd >= 1 && hd <= kMaxHeadDim, "attention: head dim {} not in [1, {}]", hd, kMaxHeadDim);
  check(T <= std::numeric_limits<int32_t>::max() && Hq <= 65535, "attention: {} rows of {} heads is too many", T, Hq);
  check(W <= std::numeric_limits<int32_t>::max() / bs, "attention: block tables of {} blocks of {} rows", W, bs);
  check(blocks <= std::numeric_limits<int32_t>::max() / bs, "attention: caches of {} blocks of {} rows (over 2^31 rows)",
        blocks, bs);
  if (T == 0) return;

  // bf16 caches (the backend's own under bf16 products) are read by every kernel but the 3xTF32
  // tiles of fp32 products, which keep fp32 caches.
  const bool bf16_cache = k_cache.dtype() == DType::BF16;
  check(!bf16_cache || bf16_matmul_, "attention: BF16 caches with fp32 products (this backend's fp32 attention "
        "keeps F32 caches)");
  // The new rows go to the caches first (gated: the rows kernel writes them).
  const int64_t row = Hkv * hd;
  const auto write_kv = [&](auto kv) {
    using KV = decltype(kv);
    launch(attention_write_kv_kernel<KV>, blocks_for(T * row, 256), 256, 0, stream_, f32(k_new), f32(v_new),
           i32(layout.slot_mapping), T, row, blocks * bs, static_cast<KV*>(k_cache.raw()),
           static_cast<KV*>(v_cache.raw()));
  };
  if (!gated) {
    if (bf16_cache) write_kv(__nv_bfloat16{});
    else write_kv(float{});
    check_launch("attention: kv write");
  }

  // Split each row's cache rows when rows x heads alone leave the GPU idle. The scratch for the
  // splits is asked for by the shapes alone (T, Hq, hd), whatever the number of splits this pass.
  // The row kernel's blocks take GB query heads of a KV head each (the largest of 4, 2, 1 that
  // divides the group): each cache row read once for GB heads.
  const int64_t group = Hq / Hkv, GB = group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
  const int64_t items = T * (Hq / GB);
  const int64_t fill = int64_t(4) * device_.sms;
  int splits = 1;
  float* part = nullptr;
  float* part_ml = nullptr;
  if (items < fill) {
    // (A block of GB heads does GB heads' work a row: its splits may be GB times shorter.)
    splits = int(std::clamp<int64_t>(std::min(cdiv(fill, items), cdiv(layout.max_kv_len, kMinSplitRows / GB)), 1,
                                     kMaxSplits));
    const size_t per_split = size_t(hd + 2);
    const size_t heads = size_t(T * Hq);  // the partials are a query head's
    float* scratch = static_cast<float*>(scratch_->bytes(heads * kMaxSplits * per_split * sizeof(float)));
    part = scratch;
    part_ml = scratch + heads * kMaxSplits * size_t(hd);
  }

  AttentionArgs a{};
  a.q = f32(q);
  a.k_cache = k_cache.raw();
  a.v_cache = v_cache.raw();
  a.cu = i32(layout.cu_seqlens);
  a.kv_lens = i32(layout.kv_lens);
  a.tables = i32(layout.block_tables);
  a.table_rows = layout.table_rows.defined() ? i32(layout.table_rows) : nullptr;
  a.out = f32_mut(out);
  a.part = part;
  a.part_ml = part_ml;
  a.B = B;
  a.T = int(T);
  a.Hq = int(Hq);
  a.Hkv = int(Hkv);
  a.hd = int(hd);
  a.bs = int(bs);
  a.bs_shift = (bs & (bs - 1)) == 0 ? std::countr_zero(uint64_t(bs)) : -1;
  a.W = int(W);
  a.splits = splits;
  a.blocks = blocks;
  // Sequences of many new rows (prefill) take the tiled kernel, the others the row kernel.
  const bool tiled = layout.max_query_len >= kTileMinRows;
  a.tile_min_rows = tiled ? kTileMinRows : std::numeric_limits<int>::max();
  a.scale = 1.0f / std::sqrt(float(hd));
  if (gated) {
    a.qg = f32(gated->qg);
    a.k_new = f32(k_new);
    a.v_new = f32(v_new);
    a.slots = i32(layout.slot_mapping);
    a.pos = i32(gated->r.positions);
    a.q_norm = gated->r.q_norm.raw();
    a.k_norm = gated->r.k_norm.raw();
    a.q_norm_dt = gated->r.q_norm.dtype();
    a.k_norm_dt = gated->r.k_norm.dtype();
    a.eps = gated->r.eps;
    a.half = gated->r.rot / 2;
    a.cache_rows = blocks * bs;
    a.freq = InvFreq<kGatedMaxHalf>::of(gated->r.theta, gated->r.rot);
  }
  const dim3 grid{unsigned(T), unsigned(Hq / GB), unsigned(splits)};
  const auto rows_kernel = [&](auto kv, auto gb) {
    using KV = decltype(kv);
    constexpr int G = decltype(gb)::value;
    const auto go = [&](auto plain, auto gated_kernel) {
      launch(gated ? gated_kernel : plain, grid, kAttnThreads, 0, stream_, a);
    };
    if (hd <= 32) go(attention_kernel<1, G, KV>, attention_kernel<1, G, KV, true>);
    else if (hd <= 64) go(attention_kernel<2, G, KV>, attention_kernel<2, G, KV, true>);
    else if (hd <= 128) go(attention_kernel<4, G, KV>, attention_kernel<4, G, KV, true>);
    else go(attention_kernel<8, G, KV>, attention_kernel<8, G, KV, true>);
  };
  const auto rows_heads = [&](auto kv) {
    if (GB == 4) rows_kernel(kv, std::integral_constant<int, 4>{});
    else if (GB == 2) rows_kernel(kv, std::integral_constant<int, 2>{});
    else rows_kernel(kv, std::integral_constant<int, 1>{});
  };
  if (bf16_cache) rows_heads(__nv_bfloat16{});
  else rows_heads(float{});
  check_launch("attention");
  const int mi = hd == 64 ? 0 : hd == 128 ? 1 : hd == 256 ? 2 : -1;  // the tensor-core kernel's head dims
  if (tiled && mi >= 0) {
    const int64_t tiles_per_seq = cdiv(layout.max_query_len, kMmaRows);
    check(tiles_per_seq * B <= std::numeric_limits<int32_t>::max(), "attention: {} sequences of up to {} rows", B,
          layout.max_query_len);
    const dim3 tgrid{unsigned(tiles_per_seq * B), unsigned(Hq)};
    const bool wgmma = kWarpgroupMma && device_.hopper() && bf16_matmul_ && bf16_cache;
    const size_t smem = wgmma          ? size_t(wgmma_smem_bytes(int(hd)))
                        : bf16_matmul_ ? size_t(bf16_smem_bytes(int(hd), bf16_cache))
                                       : size_t(mma_smem_floats(int(hd))) * sizeof(float);
    const int tps = int(tiles_per_seq);
    const auto run = [&](auto kernel) {
      smem_.allow(kernel, smem, "attention: shared memory of the tensor-core kernel");
      launch(kernel, tgrid, kMmaThreads, smem, stream_, a, tps);
    };
    if (wgmma) {
      if (mi == 0) run(attention_wgmma_kernel<64>);
      else if (mi == 1) run(attention_wgmma_kernel<128>);
      else run(attention_wgmma_kernel<256>);
    } else if (bf16_matmul_ && bf16_cache) {
      if (mi == 0) run(attention_bf16_kernel<64, __nv_bfloat16>);
      else if (mi == 1) run(attention_bf16_kernel<128, __nv_bfloat16>);
      else run(attention_bf16_kernel<256, __nv_bfloat16>);
    } else if (bf16_matmul_) {
      if (mi == 0) run(attention_bf16_kernel<64, float>);
      else if (mi == 1) run(attention_bf16_kernel<128, float>);
      else run(attention_bf16_kernel<256, float>);
    } else {
      if (mi == 0) run(attention_mma_kernel<64>);
      else if (mi == 1) run(attention_mma_kernel<128>);
      else run(attention_mma_kernel<256>);
    }
    check_launch("attention: tensor-core tiles");
  } else if (tiled) {
    const int64_t tiles_per_seq = cdiv(layout.max_query_len, kTileRows);
    check(tiles_per_seq * B <= std::numeric_limits<int32_t>::max(), "attention: {} sequences of up to {} rows", B,
          layout.max_query_len);
    const dim3 tgrid{unsigned(tiles_per_seq * B), unsigned(Hq)};
    const int vi = hd <= 32 ? 0 : hd <= 64 ? 1 : hd <= 128 ? 2 : 3;
    const int V = 1 << vi;
    const size_t smem = size_t(tile_smem_floats(V)) * sizeof(float);
    const int tps = int(tiles_per_seq);
    const auto run = [&](auto kernel) {
      smem_.allow(kernel, smem, "attention: shared memory of the tiled kernel");
      launch(kernel, tgrid, kTileThreads, smem, stream_, a, tps);
    };
    const auto tiled_kernel = [&](auto kv) {
      using KV = decltype(kv);
      if (vi == 0) run(attention_tiled_kernel<1, KV>);
      else if (vi == 1) run(attention_tiled_kernel<2, KV>);
      else if (vi == 2) run(attention_tiled_kernel<4, KV>);
      else run(attention_tiled_kernel<8, KV>);
    };
    if (bf16_cache) tiled_kernel(__nv_bfloat16{});
    else tiled_kernel(float{});
    check_launch("attention: tiled");
  }
  if (splits > 1) {
    launch(attention_merge_kernel, dim3{unsigned(T), unsigned(Hq)}, kAttnThreads, 0, stream_, a);
    check_launch("attention: merge");
  }
}

}  // namespace ballast::kernels
