// CudaOps: the stateful Gated DeltaNet ops over state pools (the CPU reference is
// cpu/cpu_deltanet.cpp over cpu/causal_conv1d.cpp and cpu/gated_delta_rule.cpp).
//
// causal_conv1d_silu: one thread per (sequence, channel, piece of kConvRows rows). The kernel taps
// and the last kc-1 inputs sit in registers; the piece starting the sequence reads the state and
// also writes the new one (read from x and the old state before any write), so that no thread
// writes what another reads. Verifying sequences (snapshot mode) run row by row in one piece and
// write the state after each row to its snapshot slot.
//
// gated_delta_rule:
// - recurrent (single rows and verifying sequences), block (sequence, value head, slice of kSlice
//   columns of dv), 4 warps; lane = column, each warp holds an interleaved quarter of the dk rows of
//   the state slice in registers. Per row: every warp normalises q and k itself (warp-private
//   shared memory), S^T k and S^T q are reduced over the warps in shared memory (one __syncthreads
//   a row), then the fused update of cpu recurrent_head: u = beta (v - d S^T k), o = d S^T q +
//   (k.q) u, S = d S + k u^T.
// - chunked WY form (the other sequences of more than one row), chunks of kChunk rows. Per chunk
//   (gc = cumulative log decay in double, D_ij = e^{gc_i - gc_j}, S0 the state entering it):
//     A_ij = beta_i D_ij (k_i . k_j) (j < i),   P_ij = D_ij (q_i . k_j) (j <= i)
//     (I + A) [W | U] = [diag(beta e^gc) K | diag(beta) V]     (forward substitution)
//     V' = U - W S0,   O = diag(e^gc) Q S0 + P V',   S = e^{gc_last} S0 + (diag(e^{gc_last - gc}) K)^T V'
//   the same function as the CPU's chunked form (which forms Tinv = (I + A)^-1 and W = Tinv
//   diag(beta e^gc) K). Two kernels: the solve kernel does every chunk of every sequence at once
//   (block: chunk, value head): T = (I + A)^-1 by 16 x 16 blocks, M = P T, then [T; M] [diag(beta
//   e^gc) K | diag(beta) V] in one product; it leaves what does not depend on S0 in scratch
//   (ChunkScratch: W, U, Q' = e^gc Q - P W, O_local = P U, K' = e^{gc_last - gc} K); the state kernel then takes
//   the chunks of each sequence in order (block: sequence, value head, column slice) and only
//   applies S0: V' = U - W S0, O = O_local + Q' S0, S = e^{gc_last} S0 + K'^T V', each warp on 16
//   value columns, keeping the state of a part of the keys transposed in registers and forming V'
//   and O for a part of the chunk's rows (8 warps a block: slices of 32, 64 or 128 columns in 4, 2
//   or 1 parts, the narrowest whose blocks fit on the SMs at once; the parts of a column group hand
//   each other S0 and V' through shared memory, so no warp's products need another's sums). The
//   products run on the tensor cores in 3xTF32 (cuda_mma_support.cuh: fp32 accuracy); under bf16
//   matrix products both kernels' in bf16 from bf16 rows and scratch (delta_rule_solve_bf16_kernel,
//   3 blocks an SM over shared memory regions reused as it goes; T's own blocks always in 3xTF32
//   from A in fp32, the state fp32 in registers); the substitution of T's diagonal blocks and the
//   exponentials (of double differences, as the CPU; the bf16 solve's by exp2f of fp32 differences
//   of gc log2(e)) on the SIMT cores.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "ballast/core/error.h"
#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_mma_support.cuh"
#include "ballast/kernels/cuda/cuda_rows_support.cuh"
#include "ballast/kernels/cuda/cuda_support.cuh"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

using namespace cuda;

namespace {

// --- the sequences of a pass -------------------------------------------------------------------

// One sequence's rows, own slot and snapshot slots as the device reads them; valid() is false where
// the layout is inconsistent (the sequence is then skipped: nothing is written through it).
struct SeqView {
  int64_t t0 = 0, n = 0;
  int slot = -1;
  const int32_t* snap = nullptr;  // the sequence's snapshot slots when it verifies, else null
  bool ok = false;
};

__device__ __forceinline__ SeqView sequence_view(const int32_t* cu, const int32_t* state_slots, const int32_t* snaps,
                                                 int snap_width, int b, int64_t T, int slots) {
  SeqView s;
  s.t0 = cu[b];
  s.n = int64_t(cu[b + 1]) - s.t0;
  s.slot = state_slots[b];
  if (snaps && snap_width > 0 && snaps[int64_t(b) * snap_width] >= 0) s.snap = snaps + int64_t(b) * snap_width;
  s.ok = s.t0 >= 0 && s.n >= 0 && s.t0 + s.n <= T && s.slot >= 0 && s.slot < slots;
  return s;
}

// The snapshot slot of row i of a verifying sequence, or -1 if there is none in range.
__device__ __forceinline__ int snapshot_slot(const int32_t* snap, int snap_width, int64_t i, int slots) {
  if (i >= snap_width) return -1;
  const int s = snap[i];
  return s >= 0 && s < slots ? s : -1;
}

// --- causal conv1d + SiLU ----------------------------------------------------------------------

constexpr int kConvThreads = 128;
constexpr int kConvRows = 64;  // rows per piece (>= 15 = the longest history)
constexpr int kConvBatch = 8;  // rows whose inputs are in flight at once

struct ConvArgs {
  const float* x;       // [T, C]
  const float* weight;  // [C, kc]
  float* states;        // [slots, C, kc-1]
  void* out;            // [T, C] of Out (the kernel's parameter: float or bf16)
  const int32_t* cu;
  const int32_t* state_slots;
  const int32_t* snaps;
  int snap_width, B, C, kc, slots, channel_blocks;
  int64_t T;
};

// An activation element from its fp32 value (the conv's rows in bf16: rounded to nearest).
__device__ __forceinline__ void store_row_element(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_row_element(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// KMAX >= kc: taps and history are right-aligned in arrays of KMAX (static indices: registers).
// Out: the rows' element (float or bf16).
template <int KMAX, typename Out>
__global__ void __launch_bounds__(kConvThreads) conv1d_silu_kernel(const ConvArgs a) {
  wait_for_prior_kernels();
  const int b = int(blockIdx.x) / a.channel_blocks;
  const int c = (int(blockIdx.x) % a.channel_blocks) * kConvThreads + int(threadIdx.x);
  const int piece = int(blockIdx.y);
  if (b >= a.B || c >= a.C) return;
  const SeqView s = sequence_view(a.cu, a.state_slots, a.snaps, a.snap_width, b, a.T, a.slots);
  if (!s.ok || s.n == 0) return;
  if (s.snap && piece > 0) return;  // verifying: one piece, row by row
  const int64_t r0 = s.snap ? 0 : int64_t(piece) * kConvRows;
  const int64_t r1 = s.snap ? s.n : std::min<int64_t>(s.n, r0 + kConvRows);
  if (r0 >= r1) return;
  const int kc = a.kc, ks = kc - 1, off = KMAX - kc;
  const int64_t C = a.C;
  const float* x = a.x + s.t0 * C + c;  // x[r * C] is row r of the sequence, channel c
  float* own = a.states + (int64_t(s.slot) * C + c) * ks;

  float wt[KMAX];
  float hist[KMAX];  // hist[j], j < KMAX-1: the input at row r - (KMAX-1) + j (entries j < off unused)
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    wt[j] = j >= off ? a.weight[int64_t(c) * kc + (j - off)] : 0.0f;
    hist[j] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < KMAX - 1; ++j) {
    if (j >= off) {
      const int64_t r = r0 - (KMAX - 1) + j;  // >= r0 - ks
      hist[j] = r >= 0 ? x[r * C] : own[ks + r];
    }
  }
  // kConvBatch rows' inputs are loaded before any of their outputs is stored: one load at a time
  // (the stores may alias x for all the compiler knows) left the kernel waiting on each (0.27 ms a
  // layer for an 8k prefill of the 80B shape, half the copy bandwidth).
  for (int64_t rb = r0; rb < r1; rb += kConvBatch) {
    float xb[kConvBatch];
#pragma unroll
    for (int u = 0; u < kConvBatch; ++u) xb[u] = rb + u < r1 ? x[(rb + u) * C] : 0.0f;
#pragma unroll
    for (int u = 0; u < kConvBatch; ++u) {
      const int64_t r = rb + u;
      if (r >= r1) break;
      const float xin = xb[u];
      float acc = 0.0f;
#pragma unroll
      for (int j = 0; j < KMAX - 1; ++j) acc += wt[j] * hist[j];
      acc += wt[KMAX - 1] * xin;
      store_row_element(static_cast<Out*>(a.out) + (s.t0 + r) * C + c, acc / (1.0f + expf(-acc)));
#pragma unroll
      for (int j = 0; j + 1 < KMAX - 1; ++j) hist[j] = hist[j + 1];
      if (KMAX >= 2) hist[KMAX - 2] = xin;
      if (s.snap) {
        const int dst = snapshot_slot(s.snap, a.snap_width, r, a.slots);
        if (dst >= 0) {
          float* st = a.states + (int64_t(dst) * C + c) * ks;
#pragma unroll
          for (int j = 0; j < KMAX - 1; ++j)
            if (j >= off) st[j - off] = hist[j];
        }
      }
    }
  }
  // The first piece of a sequence that is not verifying writes its new state: the last ks inputs
  // of [old state | rows], all read before any is written.
  if (!s.snap && piece == 0) {
    float next[KMAX];
#pragma unroll
    for (int i = 0; i < KMAX - 1; ++i) {
      next[i] = 0.0f;
      if (i < ks) {
        const int64_t r = s.n - ks + i;
        next[i] = r >= 0 ? x[r * C] : own[ks + r];
      }
    }
#pragma unroll
    for (int i = 0; i < KMAX - 1; ++i)
      if (i < ks) own[i] = next[i];
  }
}

// --- gated delta rule --------------------------------------------------------------------------

constexpr float kL2Eps = 1e-6f;
constexpr int kMaxDk = 128;
constexpr int kSlice = 32;         // dv columns per block (one per lane)
constexpr int kRecWarps = 4;
constexpr int kChunk = 64;         // rows per chunk of the chunked form
constexpr int kChunkWarps = 8;
constexpr int kChunkThreads = kChunkWarps * 32;
constexpr int kLX = kChunk + 4;  // row stride of X (whole float4s)

struct RuleArgs {
  // [T, ld]: [Q (Hk dk) | K (Hk dk) | V (Hv dv)], in fp32 (qkv) or in bf16 (qkv16; the other null):
  // the recurrent kernel reads either, the fp32 solve kernel fp32 rows, the bf16 one bf16 rows.
  const float* qkv;
  const __nv_bfloat16* qkv16;
  const float* g;    // [T, Hv]
  const float* beta; // [T, Hv]
  float* states;     // [slots, Hv, dk, dv]
  float* out;        // [T, Hv, dv]
  const int32_t* cu;
  const int32_t* state_slots;
  const int32_t* snaps;
  int64_t ld, T;
  int snap_width, B, Hk, Hv, dk, dv, slots;
};

// The pass's rows as Row (float or bf16) elements; null where they are in the other type.
template <typename Row>
__device__ __forceinline__ const Row* rule_rows(const RuleArgs& a) {
  if constexpr (std::is_same_v<Row, float>) return a.qkv;
  else return a.qkv16;
}

// One element of a row as float. bf16 loads by load_after_wait: in a kernel that stores only
// floats, the compiler may take loads of another type for unaliased and make them ld.global.nc,
// above the wait (cuda_support.cuh).
__device__ __forceinline__ float row_element(const float* p) { return *p; }
__device__ __forceinline__ float row_element(const __nv_bfloat16* p) { return load_after_wait(p); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The factors that L2-normalise a row's q (and scale it by dk^-0.5) and k, from each lane's part of
// their sums of squares: one warp a row (the recurrent kernel's rows and the chunk solve's).
__device__ __forceinline__ float2 qk_factors(int dk, float ssq, float ssk) {
  ssq = warp_sum(ssq);
  ssk = warp_sum(ssk);
  return {(1.0f / sqrtf(float(dk))) / sqrtf(ssq + kL2Eps), 1.0f / sqrtf(ssk + kL2Eps)};
}

// Row t's q (scaled by dk^-0.5) and k, each L2-normalised, read by one warp: element lane + 32 m
// in [m], zero past dk (the recurrent kernel's rows).
template <typename Row>
__device__ __forceinline__ void normalized_qk(const RuleArgs& a, int64_t t, int hk, int lane, float (&q)[kMaxDk / 32],
                                              float (&k)[kMaxDk / 32]) {
  const int dk = a.dk;
  const Row* qrow = rule_rows<Row>(a) + t * a.ld + int64_t(hk) * dk;
  const Row* krow = qrow + int64_t(a.Hk) * dk;
  float ssq = 0.0f, ssk = 0.0f;
#pragma unroll
  for (int m = 0; m < kMaxDk / 32; ++m) {
    const int p = lane + 32 * m;
    q[m] = p < dk ? row_element(qrow + p) : 0.0f;
    k[m] = p < dk ? row_element(krow + p) : 0.0f;
    ssq += q[m] * q[m];
    ssk += k[m] * k[m];
  }
  const float2 f = qk_factors(dk, ssq, ssk);
#pragma unroll
  for (int m = 0; m < kMaxDk / 32; ++m) {
    q[m] *= f.x;
    k[m] *= f.y;
  }
}

// Recurrent form. Block (sequence, value head, column slice); RPT >= ceil(dk / kRecWarps) rows of the
// state per thread: rows p = warp + kRecWarps * r. The state is loaded before the wait, while the
// kernel before (the conv) runs: only this kernel writes a sequence's state slot, and its earlier
// launches are done (the kernel before has passed its own wait). Row: the rows' element type.
template <int RPT, typename Row>
__global__ void __launch_bounds__(kRecWarps * 32) delta_rule_recurrent_kernel(const RuleArgs a) {
  const int b = int(blockIdx.x), h = int(blockIdx.y);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int j = int(blockIdx.z) * kSlice + lane;  // this thread's column of dv
  const bool col = j < a.dv;
  const SeqView s = sequence_view(a.cu, a.state_slots, a.snaps, a.snap_width, b, a.T, a.slots);
  // Sequences of more than one row that are not verifying take the chunked kernel.
  if (!s.ok || s.n == 0 || (s.n > 1 && !s.snap)) return;
  const int dk = a.dk, dv = a.dv, Hv = a.Hv;
  const int hk = h / (Hv / a.Hk);
  const int64_t kd = int64_t(a.Hk) * dk, vd = int64_t(Hv) * dv;
  const int64_t state_size = int64_t(Hv) * dk * dv;

  __shared__ float qn[kRecWarps][kMaxDk], kn[kRecWarps][kMaxDk];  // each warp's own copy
  __shared__ float2 red[2][kRecWarps][32];

  float S[RPT];
  {
    const float* src = a.states + int64_t(s.slot) * state_size + int64_t(h) * dk * dv;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int p = warp + kRecWarps * r;
      S[r] = (p < dk && col) ? src[int64_t(p) * dv + j] : 0.0f;
    }
  }
  wait_for_prior_kernels();
  for (int64_t i = 0; i < s.n; ++i) {
    const int64_t t = s.t0 + i;
    // Normalised q and k, every warp for itself.
    __syncwarp();
    float qv[kMaxDk / 32], kv[kMaxDk / 32];
    normalized_qk<Row>(a, t, hk, lane, qv, kv);
    float kq = 0.0f;
#pragma unroll
    for (int m = 0; m < kMaxDk / 32; ++m) {
      const int p = lane + 32 * m;
      if (p < dk) {
        qn[warp][p] = qv[m];
        kn[warp][p] = kv[m];
      }
      kq += qv[m] * kv[m];
    }
    kq = warp_sum(kq);
    __syncwarp();
    // This warp's part of S^T k and S^T q.
    float pk = 0.0f, pq = 0.0f;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int p = warp + kRecWarps * r;
      if (p < dk) {
        pk += kn[warp][p] * S[r];
        pq += qn[warp][p] * S[r];
      }
    }
    const int buf = int(i & 1);
    red[buf][warp][lane] = make_float2(pk, pq);
    __syncthreads();
    float skv = 0.0f, sq = 0.0f;
#pragma unroll
    for (int w = 0; w < kRecWarps; ++w) {
      const float2 e = red[buf][w][lane];
      skv += e.x;
      sq += e.y;
    }
    const float d = expf(a.g[t * Hv + h]);
    const float bt = a.beta[t * Hv + h];
    const float v = col ? row_element(rule_rows<Row>(a) + t * a.ld + 2 * kd + int64_t(h) * dv + j) : 0.0f;
    const float u = bt * (v - d * skv);
    if (warp == 0 && col) a.out[t * vd + int64_t(h) * dv + j] = d * sq + kq * u;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int p = warp + kRecWarps * r;
      if (p < dk) S[r] = d * S[r] + kn[warp][p] * u;
    }
    if (s.snap) {
      const int dst = snapshot_slot(s.snap, a.snap_width, i, a.slots);
      if (dst >= 0 && col) {
        float* st = a.states + int64_t(dst) * state_size + int64_t(h) * dk * dv;
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
          const int p = warp + kRecWarps * r;
          if (p < dk) st[int64_t(p) * dv + j] = S[r];
        }
      }
    }
  }
  if (!s.snap && col) {
    float* st = a.states + int64_t(s.slot) * state_size + int64_t(h) * dk * dv;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int p = warp + kRecWarps * r;
      if (p < dk) st[int64_t(p) * dv + j] = S[r];
    }
  }
}

// Whether the pass's q, k and v rows (of Row elements) are whole pieces of 4, aligned: fp32 rows
// whole float4s (cp.async can copy them), bf16 rows one 8-byte load a piece.
template <typename Row>
__device__ __forceinline__ bool rows_in_pieces_of_4(const RuleArgs& a) {
  return reinterpret_cast<uintptr_t>(rule_rows<Row>(a)) % (4 * sizeof(Row)) == 0 && a.ld % 4 == 0 && a.dk % 4 == 0 &&
         a.dv % 4 == 0;
}

// A chunk's decays, by one warp (lane): the cumulative log decay gc (an inclusive scan of g in
// double) with eg = e^gc and ef = e^{gc_last - gc}, and beta. Rows past n repeat the last decay with
// beta = 0: they change nothing. gc goes to `gc` in double, or to `gc_log2` as fp32 gc log2(e) for
// exp2f of differences (exponents off by ~2^-24 |gc|: far inside bf16's rounding); either may be null.
__device__ __forceinline__ void chunk_decays(const RuleArgs& a, int64_t tc, int n, int h, int lane, double* gc,
                                             float* gc_log2, float* betas, float* eg, float* ef) {
  const int Hv = a.Hv;
  double g0 = lane < n ? double(a.g[(tc + lane) * Hv + h]) : 0.0;
  double g1 = 32 + lane < n ? double(a.g[(tc + 32 + lane) * Hv + h]) : 0.0;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const double u0 = __shfl_up_sync(0xffffffffu, g0, o), u1 = __shfl_up_sync(0xffffffffu, g1, o);
    if (lane >= o) {
      g0 += u0;
      g1 += u1;
    }
  }
  g1 += __shfl_sync(0xffffffffu, g0, 31);
  const double glast = __shfl_sync(0xffffffffu, n <= 32 ? g0 : g1, (n - 1) & 31);
  const double c0v = lane < n ? g0 : glast, c1v = 32 + lane < n ? g1 : glast;
  if (gc) {
    gc[lane] = c0v;
    gc[32 + lane] = c1v;
  }
  if (gc_log2) {
    gc_log2[lane] = float(c0v * 1.4426950408889634);
    gc_log2[32 + lane] = float(c1v * 1.4426950408889634);
  }
  betas[lane] = lane < n ? a.beta[(tc + lane) * Hv + h] : 0.0f;
  betas[32 + lane] = 32 + lane < n ? a.beta[(tc + 32 + lane) * Hv + h] : 0.0f;
  eg[lane] = float(exp(c0v));
  eg[32 + lane] = float(exp(c1v));
  ef[lane] = float(exp(glast - c0v));
  ef[32 + lane] = float(exp(glast - c1v));
}

// The chunk's rows in shared memory: normalised q (scaled by dk^-0.5) and k in Qs, Ks [kChunk][lq]
// (zeros past n and dk), and its decays (chunk_decays). The rows are copied as they are (cp.async,
// all in flight at once), then normalised in place, a warp a row.
__device__ __forceinline__ void load_chunk_rows(const RuleArgs& a, int64_t tc, int n, int h, int dk, int lq, int dkp,
                                                float* Qs, float* Ks, double* gc, float* betas, float* eg, float* ef) {
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int Hv = a.Hv, hk = h / (Hv / a.Hk);
  const float* q0 = a.qkv + tc * a.ld + int64_t(hk) * dk;
  const float* k0 = q0 + int64_t(a.Hk) * dk;
  if (rows_in_pieces_of_4<float>(a)) {
    for (int i = warp; i < kChunk; i += kChunkWarps)  // a warp a row, a lane a float4
      for (int p = 4 * lane; p < dkp; p += 128) {
        const bool ok = i < n && p < dk;
        const int64_t at = ok ? i * a.ld + p : 0;
        cp_async16(Qs + i * lq + p, q0 + at, ok);
        cp_async16(Ks + i * lq + p, k0 + at, ok);
      }
    cp_async_commit();
  } else {
#pragma unroll 4
    for (int e = tid; e < kChunk * dkp; e += kChunkThreads) {
      const int i = e / dkp, p = e % dkp;
      const bool ok = i < n && p < dk;
      Qs[i * lq + p] = ok ? q0[i * a.ld + p] : 0.0f;
      Ks[i * lq + p] = ok ? k0[i * a.ld + p] : 0.0f;
    }
  }
  if (warp == 0) chunk_decays(a, tc, n, h, lane, gc, nullptr, betas, eg, ef);
  cp_async_wait_all();
  __syncthreads();
  // A warp a row, a lane a float4 of q and of k (dkp <= 128; the padding is zeros; every lane takes
  // part in the sums).
  const int p = 4 * lane;
  const bool in = p < dkp;
  for (int i = warp; i < n; i += kChunkWarps) {
    float4* q = reinterpret_cast<float4*>(Qs + i * lq + p);
    float4* k = reinterpret_cast<float4*>(Ks + i * lq + p);
    const float4 qv = in ? *q : float4{}, kv = in ? *k : float4{};
    const float2 f = qk_factors(dk, qv.x * qv.x + qv.y * qv.y + qv.z * qv.z + qv.w * qv.w,
                                kv.x * kv.x + kv.y * kv.y + kv.z * kv.z + kv.w * kv.w);
    if (in) {
      *q = float4{f.x * qv.x, f.x * qv.y, f.x * qv.z, f.x * qv.w};
      *k = float4{f.y * kv.x, f.y * kv.y, f.y * kv.z, f.y * kv.w};
    }
  }
}

// The key dim padded with zeros to whole 16-wide tensor-core steps (bf16's k; two of TF32's).
__host__ __device__ inline int padded_dk(int dk) { return (dk + 15) / 16 * 16; }

// What the solve kernel leaves for the state kernel, per row t of the pass and value head h (rows
// of dkp and dvp elements E, zero-padded: whole 16-byte pieces for cp.async): with T = (I + A)^-1 of
// the row's chunk, W = T diag(beta e^gc) K, U = T diag(beta) V, Q' = diag(e^gc) Q - P W, O = P U,
// K' = diag(e^{gc_last - gc}) K; and e^{gc_last} at the chunk's first row. The state kernel then
// does only what depends on the state entering the chunk:
//   V' = U - W S0,   out = O + Q' S0,   S = e^{gc_last} S0 + K'^T V'
// E: fp32 for 3xTF32 products; bf16 under bf16 products, the operands' own precision there (as
// flash-linear-attention keeps w, u and the states in bf16): half the bytes the state kernel
// waits on, and its products on the bf16 tensor cores (k 16 a step, where TF32 takes 8).
template <typename E>
struct ChunkScratch {
  E *qp, *w, *kp;  // [T, Hv, dkp]
  E *u, *o;        // [T, Hv, dvp]
  float* elast;    // [T, Hv]
  __host__ __device__ static int dvp(int dv) {
    constexpr int kPiece = 16 / sizeof(E);
    return (dv + kPiece - 1) / kPiece * kPiece;
  }
  static size_t bytes(int64_t T, int Hv, int dk, int dv) {
    return size_t(T) * Hv * ((3 * size_t(padded_dk(dk)) + 2 * size_t(dvp(dv))) * sizeof(E) + sizeof(float));
  }
  static ChunkScratch at(void* base, int64_t T, int Hv, int dk, int dv) {
    E* e = static_cast<E*>(base);
    const int64_t mk = T * Hv * padded_dk(dk), mv = T * Hv * dvp(dv);
    return {e, e + mk, e + 2 * mk, e + 3 * mk, e + 3 * mk + mv, reinterpret_cast<float*>(e + 3 * mk + 2 * mv)};
  }
};
template <bool kSplit>
using ScratchOf = std::conditional_t<kSplit, float, __nv_bfloat16>;

// Scratch elements from and to floats, two (a float2 or a bf16 pair) and four at a time (one at a
// time: rows::to_float).
__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = float2{a, b}; }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<uint32_t*>(p) = bf16_pair(a, b);
}
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(bf16_pair(v.x, v.y), bf16_pair(v.z, v.w));
}

__device__ __forceinline__ float4 bf16x4(uint2 w) {
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w.y));
  return {a.x, a.y, b.x, b.y};
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) { return bf16x4(*reinterpret_cast<const uint2*>(p)); }
__device__ __forceinline__ float4 scale4(float4 v, float f) { return {f * v.x, f * v.y, f * v.z, f * v.w}; }
__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// Elements p .. p + 3 of a bf16 row of `len` (zeros past it), as they are (two bf16 pairs: bf16x4
// widens them), by one 8-byte load where the pass's rows are whole pieces of 4 (`vec`:
// rows_in_pieces_of_4, so len is a multiple of 4), else one at a time. Loads that stay below the
// kernel's wait (load_after_wait). Kept in bf16 until used: half the registers a load in flight.
__device__ __forceinline__ uint2 row_piece(const __nv_bfloat16* row, int p, int len, bool vec) {
  if (vec) return p < len ? load_u2_after_wait(row + p) : uint2{0, 0};
  const auto bits = [&](int i) { return i < len ? __float_as_uint(load_after_wait(row + i)) >> 16 : 0u; };
  return {bits(p) | bits(p + 1) << 16, bits(p + 2) | bits(p + 3) << 16};
}

// Row strides of the chunks' rows: padded_dk + 4, so that lq / 4 is odd (8 consecutive rows read as
// float4 at one column cover the 32 banks once, as do a warp's A fragments of mma: 4 g + t).
__host__ __device__ inline int chunk_lq(int dk) { return padded_dk(dk) + 4; }

// Shared memory of the solve kernel, in floats (gc first: doubles). X holds A in its strictly lower
// triangle and P transposed in the rest (PT[j][i] = P_ij, j <= i), then M = P T; Y holds T = (I +
// A)^-1; Vs ([kChunk][lv], V's rows) overlays Qs once e^gc Q is in scratch.
struct SolveSmem {
  int lv;  // row stride of Vs: whole 8-column tiles plus 8 (B operand loads, k t at column g)
  int64_t gc, beta, eg, ef, X, Y, Qs, Vs, Ks, total;
  __host__ __device__ SolveSmem(int dk, int dv) {
    lv = (dv + 7) / 8 * 8 + 8;
    const int lq = chunk_lq(dk);
    int64_t o = 0;
    gc = o, o += 2 * kChunk;
    beta = o, o += kChunk;
    eg = o, o += kChunk;
    ef = o, o += kChunk;
    X = o, o += int64_t(kChunk) * kLX;
    Y = o, o += int64_t(kChunk) * kLX;
    Qs = Vs = o, o += int64_t(kChunk) * (lq > lv ? lq : lv);
    Ks = o, o += int64_t(kChunk) * lq;
    total = o;
  }
  __host__ __device__ size_t bytes() const { return size_t(total) * sizeof(float); }
};

// T = (I + A)^-1 for A strictly lower triangular (in X's lower triangle), into Y, by blocks of 16:
// the four diagonal blocks by forward substitution (a column a thread, threads 0-63), then the
// blocks below them a diagonal at a time, T_ij = -T_ii (sum over j <= k < i of A_ik T_kj), a warp a
// block on the tensor cores in 3xTF32 (whatever the products' precision: T multiplies every row of
// the chunk). Threads 64 and up zero the blocks above the diagonal meanwhile and run `alongside`.
template <typename Alongside>
__device__ void invert_unit_lower(const float* X, float* Y, Alongside alongside) {
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  if (tid < 64) {
    const int base = 16 * (tid / 16), c = tid % 16;
    float t[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      float v = r == c ? 1.0f : 0.0f;
      const float* a = X + (base + r) * kLX + base;
#pragma unroll
      for (int j = 0; j < r; ++j) v -= a[j] * t[j];
      t[r] = v;
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) Y[(base + r) * kLX + base + c] = t[r];
  } else {
    for (int e = tid - 64; e < 6 * 256; e += kChunkThreads - 64) {  // the 6 blocks above the diagonal
      const int blk = e / 256, bi = blk < 3 ? 0 : blk < 5 ? 1 : 2, bj = blk < 3 ? blk + 1 : blk < 5 ? blk - 1 : 3;
      Y[(16 * bi + (e % 256) / 16) * kLX + 16 * bj + e % 16] = 0.0f;
    }
    alongside(tid - 64, kChunkThreads - 64);
  }
  __syncthreads();
  for (int L = 1; L < 4; ++L) {
    if (warp < 4 - L) {
      const int j = warp, i = j + L;
      float s[2][4] = {};
      for (int kk = 16 * j; kk < 16 * i; kk += 8) {  // S = sum_k A_ik T_kj
        const float* a = X + (16 * i + g) * kLX + kk + t4;
        const Tf32Pair af[4] = {tf32_split(a[0]), tf32_split(a[8 * kLX]), tf32_split(a[4]),
                                tf32_split(a[8 * kLX + 4])};
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          const float* b = Y + (kk + t4) * kLX + 16 * j + 8 * nj + g;
          const Tf32Pair bf[2] = {tf32_split(b[0]), tf32_split(b[4 * kLX])};
          mma_3xtf32(s[nj], af, bf);
        }
      }
      float* yij = Y + 16 * i * kLX + 16 * j;  // S staged where T_ij goes, then T_ii S
#pragma unroll
      for (int nj = 0; nj < 2; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) yij[(g + 8 * (e / 2)) * kLX + 8 * nj + 2 * t4 + (e & 1)] = s[nj][e];
      __syncwarp();
      float r[2][4] = {};
#pragma unroll
      for (int kk = 0; kk < 16; kk += 8) {
        const float* a = Y + (16 * i + g) * kLX + 16 * i + kk + t4;
        const Tf32Pair af[4] = {tf32_split(a[0]), tf32_split(a[8 * kLX]), tf32_split(a[4]),
                                tf32_split(a[8 * kLX + 4])};
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          const float* b = yij + (kk + t4) * kLX + 8 * nj + g;
          const Tf32Pair bf[2] = {tf32_split(b[0]), tf32_split(b[4 * kLX])};
          mma_3xtf32(r[nj], af, bf);
        }
      }
      __syncwarp();
#pragma unroll
      for (int nj = 0; nj < 2; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) yij[(g + 8 * (e / 2)) * kLX + 8 * nj + 2 * t4 + (e & 1)] = -r[nj][e];
    }
    __syncthreads();
  }
}

// The chunk a solve block (chunk of a sequence, value head) takes: its first row tc of the pass and
// its n rows; n = 0 where it has none (past the sequences or the sequence's end, or a sequence the
// recurrent kernel takes).
struct SolveChunk {
  int64_t tc = 0;
  int n = 0;
};
__device__ __forceinline__ SolveChunk solve_chunk(const RuleArgs& a, int chunks_per_seq) {
  const int b = int(blockIdx.x) / chunks_per_seq, c = int(blockIdx.x) % chunks_per_seq;
  if (b >= a.B) return {};
  const SeqView s = sequence_view(a.cu, a.state_slots, a.snaps, a.snap_width, b, a.T, a.slots);
  if (!s.ok || s.n <= 1 || s.snap) return {};  // the recurrent kernel's sequences
  const int64_t c0 = int64_t(c) * kChunk;
  if (c0 >= s.n) return {};
  return {s.t0 + c0, int(s.n - c0 < kChunk ? s.n - c0 : kChunk)};
}

// Chunked form, part 1, every chunk at once, with fp32 products (3xTF32): block (chunk, value
// head), 8 warps. Forms P and A (X) on the tensor cores; writes K' and e^gc Q; T = (I + A)^-1 (Y)
// and M = P T (into X); then one product [T; M] R with R = [diag(beta e^gc) K | diag(beta) V] gives
// [W | U] (T's rows) and [P W | P U] (M's rows): Q' = e^gc Q - P W, O = P U.
template <int kHeadDim>
__global__ void __launch_bounds__(kChunkThreads, 2)
    delta_rule_solve_kernel(const RuleArgs a, ChunkScratch<float> cs, int chunks_per_seq) {
  wait_for_prior_kernels();
  const auto tf = [](float v) { return tf32_split(v); };  // an operand of the products (3xTF32)
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int h = int(blockIdx.y);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t4 = lane % 4;
  const SolveChunk chunk = solve_chunk(a, chunks_per_seq);
  if (chunk.n == 0) return;
  const int n = chunk.n;
  const int64_t tc = chunk.tc;
  // kHeadDim: the key and value head dims known when compiled (the Qwen models' 128), or 0.
  const int dk = kHeadDim ? kHeadDim : a.dk, dv = kHeadDim ? kHeadDim : a.dv, Hv = a.Hv;
  const int lq = chunk_lq(dk), dkp = padded_dk(dk);
  const int dvp = decltype(cs)::dvp(dv), dv8 = (dv + 7) / 8 * 8;
  const SolveSmem L(dk, dv);
  const int lv = L.lv;
  double* gc = reinterpret_cast<double*>(smem + L.gc);
  float* betas = smem + L.beta;
  float* eg = smem + L.eg;
  float* ef = smem + L.ef;
  float* X = smem + L.X;
  float* Y = smem + L.Y;
  float* Qs = smem + L.Qs;  // [kChunk][lq]
  float* Vs = smem + L.Vs;  // [kChunk][lv], over Qs
  float* Ks = smem + L.Ks;
  load_chunk_rows(a, tc, n, h, dk, lq, dkp, Qs, Ks, gc, betas, eg, ef);
  __syncthreads();

  // P_ij = D_ij (q_i . k_j) (j <= i) and A_ij = beta_i D_ij (k_i . k_j) (j < i) on the tensor cores:
  // warp w has rows 16 (w % 4) .. + 15 and columns 32 (w / 4) .. + 31 of both (B = K^T: (k t, n g) is
  // K[j0 + g][t]). The warp of rows 0-15 and columns 32-63 is all above the diagonal: no work.
  {
    const int i0 = 16 * (warp & 3), jc = 32 * (warp >> 2);
    if (jc <= i0 + 15) {
      float qk[4][4] = {}, kk[4][4] = {};
      const float* qa = Qs + (i0 + g) * lq + t4;
      const float* ka = Ks + (i0 + g) * lq + t4;
      const float* kb = Ks + (jc + g) * lq + t4;
      for (int p = 0; p < dkp; p += 8) {
        const Tf32Pair qf[4] = {tf(qa[p]), tf(qa[8 * lq + p]), tf(qa[p + 4]), tf(qa[8 * lq + p + 4])};
        const Tf32Pair kf[4] = {tf(ka[p]), tf(ka[8 * lq + p]), tf(ka[p + 4]), tf(ka[8 * lq + p + 4])};
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
          const Tf32Pair bf[2] = {tf(kb[8 * nj * lq + p]), tf(kb[8 * nj * lq + p + 4])};
          mma_3xtf32(qk[nj], qf, bf);
          mma_3xtf32(kk[nj], kf, bf);
        }
      }
#pragma unroll
      for (int nj = 0; nj < 4; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + g + 8 * (e / 2), jj = jc + 8 * nj + 2 * t4 + (e & 1);
          if (jj > i) continue;
          const float dec = expf(float(gc[i] - gc[jj]));
          X[jj * kLX + i] = dec * qk[nj][e];                         // P, transposed
          if (jj < i) X[i * kLX + jj] = betas[i] * dec * kk[nj][e];  // A
        }
    }
  }
  // K' and e^gc Q (the first term of Q') to scratch, zero-padded rows of dkp: a warp a row, a lane
  // a float4 (by e / dkp, e % dkp a float, this took 16% of the kernel's instructions).
  for (int i = warp; i < n; i += kChunkWarps) {
    const int64_t at = ((tc + i) * Hv + h) * dkp;
    const float fi = ef[i], gi = eg[i];
    for (int p = 4 * lane; p < dkp; p += 128) {
      const float4 k = *reinterpret_cast<const float4*>(Ks + i * lq + p);
      const float4 q = *reinterpret_cast<const float4*>(Qs + i * lq + p);
      store4(cs.kp + at + p, float4{fi * k.x, fi * k.y, fi * k.z, fi * k.w});
      store4(cs.qp + at + p, float4{gi * q.x, gi * q.y, gi * q.z, gi * q.w});
    }
  }
  if (threadIdx.x == 0) cs.elast[tc * Hv + h] = eg[n - 1];
  __syncthreads();  // X formed; Qs and Ks read

  // V's rows over Q (zeros past n and dv; cp.async where they are whole float4s, in flight while T
  // is formed, else loaded by the threads the inverse leaves free); T into Y.
  const float* v = a.qkv + tc * a.ld + 2 * int64_t(a.Hk) * dk + int64_t(h) * dv;
  const bool async_v = rows_in_pieces_of_4<float>(a);
  if (async_v) {
    for (int e = int(threadIdx.x); e < kChunk * (dv8 / 4); e += kChunkThreads) {
      const int i = e / (dv8 / 4), j = 4 * (e % (dv8 / 4));
      const bool ok = i < n && j < dv;
      cp_async16(Vs + i * lv + j, v + (ok ? i * a.ld + j : 0), ok);
    }
    cp_async_commit();
  }
  invert_unit_lower(X, Y, [&](int t, int threads) {
    if (async_v) return;
#pragma unroll 4
    for (int e = t; e < kChunk * dv8; e += threads) {
      const int i = e / dv8, j = e % dv8;
      Vs[i * lv + j] = i < n && j < dv ? v[i * a.ld + j] : 0.0f;
    }
  });
  cp_async_wait_all();  // V, seen by all after the next barrier

  // M = P T (A = P from X's upper triangle, masked to m <= i; B = T): warp w has rows 16 (w % 4)
  // .. + 15 and columns 32 (w / 4) .. + 31; into X once every warp has read it.
  {
    const int i0 = 16 * (warp & 3), jc = 32 * (warp >> 2);
    float m[4][4] = {};
    for (int kk = 0; kk < i0 + 16; kk += 8) {
      const auto p_at = [&](int i, int mm) { return tf(mm <= i ? X[mm * kLX + i] : 0.0f); };
      const Tf32Pair af[4] = {p_at(i0 + g, kk + t4), p_at(i0 + g + 8, kk + t4), p_at(i0 + g, kk + t4 + 4),
                              p_at(i0 + g + 8, kk + t4 + 4)};
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        const float* bb = Y + (kk + t4) * kLX + jc + 8 * nj + g;
        const Tf32Pair bf[2] = {tf(bb[0]), tf(bb[4 * kLX])};
        mma_3xtf32(m[nj], af, bf);
      }
    }
    __syncthreads();  // every warp has read P
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) X[(i0 + g + 8 * (e / 2)) * kLX + jc + 8 * nj + 2 * t4 + (e & 1)] = m[nj][e];
  }
  __syncthreads();

  // [T; M] R on the tensor cores: warp w takes columns 16 w .. + 15 of R (then + 128 ...), first
  // for T's 4 row blocks, then for M's (both lower triangular: the block of rows 16 r .. needs only
  // k < 16 r + 16), so that each B fragment serves 4 row blocks.
  const int cols = dkp + dv8;
  for (int c16 = 16 * warp; c16 < cols; c16 += 16 * kChunkWarps)
    for (int part = 0; part < 2; ++part) {  // T, M
      const float* A = part == 0 ? Y : X;
      float acc[4][2][4] = {};
      for (int kk = 0; kk < kChunk; kk += 8) {
        const float bt0 = betas[kk + t4], bt1 = betas[kk + t4 + 4];  // R's row scales
        const float bk0 = bt0 * eg[kk + t4], bk1 = bt1 * eg[kk + t4 + 4];
        Tf32Pair bf[2][2];
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          const int col = c16 + 8 * nj + g;
          const bool in_k = col < dkp, in = col < cols;
          const float* r = in_k ? Ks + (kk + t4) * lq + col : Vs + (kk + t4) * lv + (col - dkp);
          bf[nj][0] = tf(in ? r[0] * (in_k ? bk0 : bt0) : 0.0f);
          bf[nj][1] = tf(in ? r[4 * (in_k ? lq : lv)] * (in_k ? bk1 : bt1) : 0.0f);
        }
#pragma unroll
        for (int rb = 0; rb < 4; ++rb) {
          if (kk >= 16 * rb + 16) continue;
          const float* am = A + (16 * rb + g) * kLX + kk + t4;
          const Tf32Pair af[4] = {tf(am[0]), tf(am[8 * kLX]), tf(am[4]), tf(am[8 * kLX + 4])};
#pragma unroll
          for (int nj = 0; nj < 2; ++nj) mma_3xtf32(acc[rb][nj], af, bf[nj]);
        }
      }
      // T's rows: W and U; M's: Q' = e^gc Q - P W (e^gc Q is in scratch: a row block's loaded
      // together, not each waited for before its store) and O = P U.
#pragma unroll
      for (int rb = 0; rb < 4; ++rb) {
        float2 eq[2][2] = {};
#pragma unroll
        for (int nj = 0; nj < 2; ++nj)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = 16 * rb + g + 8 * hf, col = c16 + 8 * nj + 2 * t4;
            if (part == 1 && i < n && col < dkp)
              eq[nj][hf] = load2(cs.qp + ((tc + i) * Hv + h) * dkp + col);
          }
#pragma unroll
        for (int nj = 0; nj < 2; ++nj)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = 16 * rb + g + 8 * hf, col = c16 + 8 * nj + 2 * t4;
            if (i >= n || col >= cols) continue;
            const float x0 = acc[rb][nj][2 * hf], x1 = acc[rb][nj][2 * hf + 1];
            const int64_t row = (tc + i) * Hv + h;
            if (col < dkp) {
              const float2 e = eq[nj][hf];
              if (part == 0) store2(cs.w + row * dkp + col, x0, x1);
              else store2(cs.qp + row * dkp + col, e.x - x0, e.y - x1);
            } else if (col - dkp < dvp) {
              store2((part == 0 ? cs.u : cs.o) + row * dvp + (col - dkp), x0, x1);
            }
          }
      }
    }
}

// Shared memory of the bf16 solve kernel, in bytes: the decays (gc log2(e) in fp32, beta, e^gc,
// e^{gc_last - gc}), then four regions that change roles as the block goes (17 KB each at dk = dv =
// 128: ~70 KB, three blocks an SM: the kernel is latency-bound, and more warps hide more of it):
//   R1: A in fp32 [kChunk][kLX], then T in bf16 [kChunk][kLT] once the inverse is done;
//   R2: T in fp32 (the inverse's Y), then R's value part diag(beta) V [kChunk][lv];
//   R3: q normalised in bf16 [kChunk][lk], then P [kChunk][kLT], then -M = -P T;
//   R4: k normalised in bf16 [kChunk][lk], then R's key part diag(beta e^gc) K.
// The bf16 row strides are odd multiples of 16 bytes: ldmatrix's 8 row reads of a matrix fall on
// 32 distinct banks.
constexpr int kLT = kChunk + 8;
struct SolveBf16Smem {
  int lk, lv, dv16;
  int64_t gl, beta, eg, ef, R1, R2, R3, R4, total;
  __host__ __device__ SolveBf16Smem(int dk, int dv) {
    dv16 = (dv + 15) / 16 * 16;
    lk = padded_dk(dk) + 8;
    lv = dv16 + 8;
    const int64_t fp32_rows = 4 * int64_t(kChunk) * kLX, q_rows = 2 * int64_t(kChunk) * lk;
    const int64_t v_rows = 2 * int64_t(kChunk) * lv, t_rows = 2 * int64_t(kChunk) * kLT;
    int64_t o = 0;
    gl = o, o += 4 * kChunk;
    beta = o, o += 4 * kChunk;
    eg = o, o += 4 * kChunk;
    ef = o, o += 4 * kChunk;
    R1 = o, o += fp32_rows > t_rows ? fp32_rows : t_rows;
    R2 = o, o += fp32_rows > v_rows ? fp32_rows : v_rows;
    R3 = o, o += q_rows > t_rows ? q_rows : t_rows;
    R4 = o, o += q_rows;
    total = o;
  }
  __host__ __device__ size_t bytes() const { return size_t(total); }
};

// 8 bf16 (16 bytes) times f, rounded to bf16 again.
__device__ __forceinline__ uint4 scale8(uint4 v, float f) {
  uint32_t* w = &v.x;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[k]));
    w[k] = bf16_pair(f * x.x, f * x.y);
  }
  return v;
}

// Chunked form, part 1, every chunk at once, with bf16 products: block (chunk, value head), 8
// warps, three blocks an SM; the same scratch as the kernel above (in bf16), its products on the
// bf16 tensor cores from bf16 rows read by ldmatrix (fp32 sums; flash-linear-attention keeps its
// operands in bf16 too), but T = (I + A)^-1 from A in fp32 by invert_unit_lower's 3xTF32 (T
// multiplies every row). The pass's q, k and v rows come in bf16 (a.qkv16, as the conv writes them
// under bf16 products):
//   1. q and k normalised into bf16 rows, a warp a row (all its rows' loads in flight at once);
//   2. P (bf16) and A (fp32) from Q K^T and K K^T; e^gc Q to Q' scratch (where Q' = e^gc Q - P W
//      is finished in 4b: no room for it in shared memory);
//   3. T into Y, while the threads the inverse leaves free write K' and turn K's rows into R's key
//      part; then V's loads, in flight through T's conversion to bf16 and M = P T;
//   4. [T; M] R: W and U from T's rows, Q' and O = P U from M's (stored as -M: M's key products
//      then subtract from e^gc Q in the accumulators).
template <int kHeadDim>
__global__ void __launch_bounds__(kChunkThreads, 3)
    delta_rule_solve_bf16_kernel(const RuleArgs a, ChunkScratch<__nv_bfloat16> cs, int chunks_per_seq) {
  wait_for_prior_kernels();
  extern __shared__ float4 smem_f4[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem_f4);
  const int h = int(blockIdx.y);
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const SolveChunk chunk = solve_chunk(a, chunks_per_seq);
  if (chunk.n == 0) return;
  const int n = chunk.n;
  const int64_t tc = chunk.tc;
  // kHeadDim: the key and value head dims known when compiled (the Qwen models' 128), or 0.
  const int dk = kHeadDim ? kHeadDim : a.dk, dv = kHeadDim ? kHeadDim : a.dv, Hv = a.Hv;
  const int dkp = padded_dk(dk), dvp = ChunkScratch<__nv_bfloat16>::dvp(dv);
  const SolveBf16Smem L(dk, dv);
  const int lk = L.lk, lv = L.lv;
  float* gl = reinterpret_cast<float*>(smem + L.gl);
  float* betas = reinterpret_cast<float*>(smem + L.beta);
  float* eg = reinterpret_cast<float*>(smem + L.eg);
  float* ef = reinterpret_cast<float*>(smem + L.ef);
  float* X = reinterpret_cast<float*>(smem + L.R1);
  __nv_bfloat16* Tb = reinterpret_cast<__nv_bfloat16*>(smem + L.R1);
  float* Y = reinterpret_cast<float*>(smem + L.R2);
  __nv_bfloat16* Rv = reinterpret_cast<__nv_bfloat16*>(smem + L.R2);
  __nv_bfloat16* Qb = reinterpret_cast<__nv_bfloat16*>(smem + L.R3);
  __nv_bfloat16* Pb = reinterpret_cast<__nv_bfloat16*>(smem + L.R3);
  __nv_bfloat16* Kb = reinterpret_cast<__nv_bfloat16*>(smem + L.R4);
  const bool vec = rows_in_pieces_of_4<__nv_bfloat16>(a);
  const auto scratch_row = [&](int i) { return (tc + i) * Hv + h; };

  // 1. A warp a row, a lane elements 4 lane .. + 3 of q and k (dk <= 128; zeros past n and dk), all
  // of a warp's rows' loads in flight at once.
  {
    constexpr int kRows = kChunk / kChunkWarps;
    const int hk = h / (Hv / a.Hk), p = 4 * lane;
    const __nv_bfloat16* q0 = a.qkv16 + tc * a.ld + int64_t(hk) * dk;
    const __nv_bfloat16* k0 = q0 + int64_t(a.Hk) * dk;
    if (warp == kChunkWarps - 1) chunk_decays(a, tc, n, h, lane, nullptr, gl, betas, eg, ef);
    uint2 qr[kRows], kr[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = warp + kChunkWarps * r;
      qr[r] = i < n ? row_piece(q0 + i * a.ld, p, dk, vec) : uint2{0, 0};
      kr[r] = i < n ? row_piece(k0 + i * a.ld, p, dk, vec) : uint2{0, 0};
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = warp + kChunkWarps * r;
      const float4 qv = bf16x4(qr[r]), kv = bf16x4(kr[r]);
      const float2 f = qk_factors(dk, dot4(qv, qv), dot4(kv, kv));
      if (p < dkp) {
        store4(Qb + i * lk + p, scale4(qv, f.x));
        store4(Kb + i * lk + p, scale4(kv, f.y));
      }
    }
  }
  __syncthreads();

  // 2. P_ij = D_ij (q_i . k_j) (j <= i, zeros above) and A_ij = beta_i D_ij (k_i . k_j) (j < i; the
  // inverse reads no other element of X): warp w has rows 16 (w % 4) .. + 15 and columns 32 (w / 4)
  // .. + 31 of both (B = K^T from K's rows). The warp of rows 0-15 and columns 32-63 is all above the
  // diagonal: it only writes P's zeros. P waits in registers until every warp has read Q.
  uint32_t pp[2][4];
  {
    const int i0 = 16 * (warp & 3), jc = 32 * (warp >> 2);
    float qk[4][4] = {}, kk[4][4] = {};
    if (jc <= i0 + 15) {
      const __nv_bfloat16* qa = Qb + (i0 + lane % 16) * lk + 8 * (lane / 16);
      const __nv_bfloat16* ka = Kb + (i0 + lane % 16) * lk + 8 * (lane / 16);
      const __nv_bfloat16* kb = Kb + (jc + 8 * (lane / 16) + lane % 8) * lk + 8 * ((lane / 8) % 2);
      for (int p = 0; p < dkp; p += 16) {
        uint32_t qf[4], kf[4];
        ldmatrix_x4(qf, qa + p);
        ldmatrix_x4(kf, ka + p);
#pragma unroll
        for (int nj = 0; nj < 4; nj += 2) {
          uint32_t bf[4];
          ldmatrix_x4(bf, kb + 8 * nj * lk + p);
          mma_bf16(qk[nj], qf, bf[0], bf[1]);
          mma_bf16(qk[nj + 1], qf, bf[2], bf[3]);
          mma_bf16(kk[nj], kf, bf[0], bf[1]);
          mma_bf16(kk[nj + 1], kf, bf[2], bf[3]);
        }
      }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = i0 + g + 8 * hf;
      const float gi = gl[i], bi = betas[i];
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        const int j = jc + 8 * nj + 2 * t4;
        const float2 gj = *reinterpret_cast<const float2*>(gl + j);
        const float d0 = j <= i ? exp2f(gi - gj.x) : 0.0f, d1 = j + 1 <= i ? exp2f(gi - gj.y) : 0.0f;
        pp[hf][nj] = bf16_pair(d0 * qk[nj][2 * hf], d1 * qk[nj][2 * hf + 1]);
        if (j < i) X[i * kLX + j] = bi * d0 * kk[nj][2 * hf];
        if (j + 1 < i) X[i * kLX + j + 1] = bi * d1 * kk[nj][2 * hf + 1];
      }
    }
    // e^gc Q to Q' scratch, 8 elements a piece.
    const int pieces = dkp / 8;
    for (int e = tid; e < kChunk * pieces; e += kChunkThreads) {
      const int i = e / pieces, p = 8 * (e % pieces);
      if (i < n)
        *reinterpret_cast<uint4*>(cs.qp + scratch_row(i) * dkp + p) =
            scale8(*reinterpret_cast<const uint4*>(Qb + i * lk + p), eg[i]);
    }
    __syncthreads();  // Q and K read; A formed
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int nj = 0; nj < 4; ++nj)
        *reinterpret_cast<uint32_t*>(Pb + (i0 + g + 8 * hf) * kLT + jc + 8 * nj + 2 * t4) = pp[hf][nj];
  }

  // 3. T = (I + A)^-1 into Y. Beside it: K' = diag(e^{gc_last - gc}) K to scratch and K's rows
  // scaled into R's key part.
  invert_unit_lower(X, Y, [&](int t, int threads) {
    const int kp = dkp / 4;
    for (int e = t; e < kChunk * kp; e += threads) {
      const int i = e / kp, p = 4 * (e % kp);
      const float4 k = load4(Kb + i * lk + p);
      if (i < n) store4(cs.kp + scratch_row(i) * dkp + p, scale4(k, ef[i]));
      store4(Kb + i * lk + p, scale4(k, betas[i] * eg[i]));
    }
  });
  if (tid == 0) cs.elast[tc * Hv + h] = eg[n - 1];
  // V's rows: the first kVLoads pieces of 4 a thread (128 columns' worth: all of Qwen's) in flight
  // through T's conversion to bf16 over A (read no more: the inverse's last barrier is behind us)
  // and M = P T, the rest loaded after M.
  const __nv_bfloat16* v0 = a.qkv16 + tc * a.ld + 2 * int64_t(a.Hk) * dk + int64_t(h) * dv;
  const int vp = L.dv16 / 4;
  const auto v_piece = [&](int e) {
    const int i = e / vp, j = 4 * (e % vp);
    return i < n ? row_piece(v0 + i * a.ld, j, dv, vec) : uint2{0, 0};
  };
  const auto store_v = [&](int e, uint2 v) {
    const int i = e / vp, j = 4 * (e % vp);
    store4(Rv + i * lv + j, scale4(bf16x4(v), betas[i]));
  };
  constexpr int kVLoads = kChunk * 32 / kChunkThreads;
  uint2 vr[kVLoads];
#pragma unroll
  for (int r = 0; r < kVLoads; ++r) {
    const int e = tid + kChunkThreads * r;
    vr[r] = e < kChunk * vp ? v_piece(e) : uint2{0, 0};
  }
  for (int e = tid; e < kChunk * kChunk / 4; e += kChunkThreads) {
    const int i = e / (kChunk / 4), j = 4 * (e % (kChunk / 4));
    store4(Tb + i * kLT + j, *reinterpret_cast<const float4*>(Y + i * kLX + j));
  }
  __syncthreads();  // T in bf16; Y read

  // 4a. M = P T: warp w has rows 16 (w % 4) .. + 15 (P's row block is zero past its diagonal
  // block) and columns 32 (w / 4) .. + 31; V's rows into R2 meanwhile; -M into R3 once every warp
  // has read P.
  {
    const int rb = warp & 3, jc = 32 * (warp >> 2);
    float m[4][4] = {};
    const __nv_bfloat16* pa = Pb + (16 * rb + lane % 16) * kLT + 8 * (lane / 16);
    const __nv_bfloat16* tb = Tb + (8 * ((lane / 8) % 2) + lane % 8) * kLT + jc + 8 * (lane / 16);
    for (int kk = 0; kk <= rb; ++kk) {
      uint32_t pf[4];
      ldmatrix_x4(pf, pa + 16 * kk);
#pragma unroll
      for (int nj = 0; nj < 4; nj += 2) {
        uint32_t tf[4];
        ldmatrix_x4_trans(tf, tb + 16 * kk * kLT + 8 * nj);
        mma_bf16(m[nj], pf, tf[0], tf[1]);
        mma_bf16(m[nj + 1], pf, tf[2], tf[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < kVLoads; ++r) {
      const int e = tid + kChunkThreads * r;
      if (e < kChunk * vp) store_v(e, vr[r]);
    }
    for (int e = tid + kChunkThreads * kVLoads; e < kChunk * vp; e += kChunkThreads) store_v(e, v_piece(e));
    __syncthreads();
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        *reinterpret_cast<uint32_t*>(Pb + (16 * rb + g + 8 * hf) * kLT + jc + 8 * nj + 2 * t4) =
            bf16_pair(-m[nj][2 * hf], -m[nj][2 * hf + 1]);
  }
  __syncthreads();

  // 4b. [T; M] R: R's 16-column steps s go to warp s % 8, the key part's (Kb, below dkp) in one
  // loop and the value part's (Rv) in another (dkp is whole steps); T's rows then M's (-M's) a step.
  // Both are lower triangular: row block rb needs the k steps up to its own. T's rows give W and U;
  // M's start from e^gc Q (the key part; zeros for the value part) and give Q' = e^gc Q - P W and
  // -O = -P U. Stored a row at a time.
  const int key_steps = dkp / 16, steps = key_steps + L.dv16 / 16;
  const auto product = [&](auto key_part) {
    constexpr bool kKey = decltype(key_part)::value;
    const int lr = kKey ? lk : lv;
    int s0 = warp;
    if (!kKey)
      while (s0 < key_steps) s0 += kChunkWarps;
    for (int st = s0; st < (kKey ? key_steps : steps); st += kChunkWarps) {
      const int c16 = 16 * st - (kKey ? 0 : dkp);  // the step's first column of its part
      const int col = c16 + 2 * t4;
      const __nv_bfloat16* rr = (kKey ? Kb : Rv) + c16 + (8 * ((lane / 8) % 2) + lane % 8) * lr + 8 * (lane / 16);
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        const __nv_bfloat16* lhs = part == 0 ? Tb : Pb;
        float acc[4][2][4];
#pragma unroll
        for (int rb = 0; rb < 4; ++rb)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = 16 * rb + g + 8 * hf;
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
              float2 q = {0.0f, 0.0f};
              if (kKey && part == 1 && i < n) q = load2(cs.qp + scratch_row(i) * dkp + col + 8 * nj);
              acc[rb][nj][2 * hf] = q.x, acc[rb][nj][2 * hf + 1] = q.y;
            }
          }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, rr + 16 * kk * lr);
#pragma unroll
          for (int rb = kk; rb < 4; ++rb) {
            uint32_t af[4];
            ldmatrix_x4(af, lhs + (16 * rb + lane % 16) * kLT + 16 * kk + 8 * (lane / 16));
            mma_bf16(acc[rb][0], af, bf[0], bf[1]);
            mma_bf16(acc[rb][1], af, bf[2], bf[3]);
          }
        }
#pragma unroll
        for (int rb = 0; rb < 4; ++rb)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = 16 * rb + g + 8 * hf;
            if (i >= n) continue;
            const int64_t row = scratch_row(i);
            if constexpr (kKey) {
              __nv_bfloat16* out = (part == 0 ? cs.w : cs.qp) + row * dkp + col;
#pragma unroll
              for (int nj = 0; nj < 2; ++nj) store2(out + 8 * nj, acc[rb][nj][2 * hf], acc[rb][nj][2 * hf + 1]);
            } else {
              __nv_bfloat16* out = (part == 0 ? cs.u : cs.o) + row * dvp + col;
              const float sign = part == 0 ? 1.0f : -1.0f;
#pragma unroll
              for (int nj = 0; nj < 2; ++nj)
                if (col + 8 * nj < dvp)
                  store2(out + 8 * nj, sign * acc[rb][nj][2 * hf], sign * acc[rb][nj][2 * hf + 1]);
            }
          }
      }
    }
  };
  product(std::true_type{});
  product(std::false_type{});
}

// Shared memory of the state kernel of `width` value columns a block in `ks` parts (of the keys and
// rows), for scratch elements of `es` bytes, in bytes: Qp, Ws [kChunk][lw] (Q', W), Kp
// [2][kChunk][lk] (K', two: the next chunk's lands while this one's is read), Us, Os [kChunk][lu]
// (the block's columns of U and O, read at row 2t, column g), and with ks > 1 what the warps of a
// value group hand each other: Ss [width / 16][16][ls] (S0^T, each part's keys) and Vs [width /
// 16][16][lv] (V'^T, each part's rows). fp32: Q' and W are B operands read as float2 at row g,
// column 2t (lw = dkp + 8: a row stride of 8 mod 32 banks puts each half warp's on 32 banks), K'
// at row 2t, column g (lk = dkp + 4), U and O too (lu = width + 4), S0^T and V'^T as float2 at
// row g, column 2t (ls = dkp + 8, lv = kChunk + 8). bf16: Q', W, K', S0^T and V'^T read by
// ldmatrix, whose 8 row reads of a matrix a row stride of 16 bytes mod 128 puts on 32 banks (+ 8
// elements), U and O at width + 8 (whole 16-byte pieces).
struct StateSmem {
  int dkp, lw, lk, lu, ls, lv;
  int64_t Qp, Ws, Kp, Us, Os, Ss, Vs, total;
  __host__ __device__ StateSmem(int dk, int width, int ks, int es) {
    dkp = padded_dk(dk);
    lw = dkp + 8;
    lk = es == 4 ? dkp + 4 : dkp + 8;
    lu = es == 4 ? width + 4 : width + 8;
    ls = dkp + 8;
    lv = kChunk + 8;
    const int64_t groups = width / 16;
    int64_t o = 0;
    Qp = o, o += int64_t(kChunk) * lw * es;
    Ws = o, o += int64_t(kChunk) * lw * es;
    Kp = o, o += 2 * int64_t(kChunk) * lk * es;
    Us = o, o += int64_t(kChunk) * lu * es;
    Os = o, o += int64_t(kChunk) * lu * es;
    Ss = o, o += ks > 1 ? groups * 16 * ls * es : 0;
    Vs = o, o += ks > 1 ? groups * 16 * lv * es : 0;
    total = o;
  }
  __host__ __device__ size_t bytes() const { return size_t(total); }
};

// Chunked form, part 2, the chunks of a sequence in order: block (sequence, value head, slice of
// 16 kGroups value columns), kGroups x kKs warps. Warp (group v, part p) owns 16 value columns,
// keeps the state of its columns and of 1 / kKs of the keys transposed in registers, S^T [16 x
// dk / kKs] in the accumulator layout of mma (st[i]: value rows g, g + 8, keys 8 kt + 2t, + 1 for
// the part's i-th key tile kt), and takes 1 / kKs of the chunk's rows in step 1:
//   1. [out - O | U - V']^T = S0^T [Q' | W]^T over the part's rows (A = S0^T over every key, B =
//      Q'^T, W^T): no sums across warps, each warp writes its rows of out;
//   2. S^T = e^{gc_last} S0^T + V'^T K' over the part's keys (A = V'^T over every row).
// With kKs > 1 the warps of a group hand each other S0^T (each part's keys, before step 1) and
// V'^T (each part's rows, before step 2) through shared memory in the operands' type: the state and
// V' are rounded to bf16 as operands either way (or split into 3xTF32 pairs from their fp32), so
// the products are those of one warp taking all of them. An accumulator read as a TF32 A operand
// holds columns 2t, 2t + 1 where A has t, t + 4: the k index is relabelled (logical t -> 2t, t + 4
// -> 2t + 1), so B is read at rows 2t, 2t + 1 to match (one float2 for Q' and W). The next chunk's
// K' loads (cp.async) through both steps, its Q', W, U and O through step 2: two barriers a chunk.
// Splitting the keys and rows puts more warps on a chunk's chain of products where the value
// columns are few (one warp has 16 of them).
template <bool kSplit, int kGroups, int kKs, int kHeadDim>
__global__ void __launch_bounds__(kGroups * kKs * 32, 1)
    delta_rule_state_kernel(const RuleArgs a, ChunkScratch<ScratchOf<kSplit>> cs) {
  wait_for_prior_kernels();
  const auto tf = [](float v) { return tf32_operand<kSplit>(v); };  // an operand of the products
  constexpr int kW = 16 * kGroups, kThreads = 32 * kGroups * kKs, kTiles = kMaxDk / 8 / kKs, kRows = 8 / kKs;
  static_assert(kKs == 1 || kKs == 2 || kKs == 4, "the parts: 1, 2 or 4");
  using E = ScratchOf<kSplit>;
  constexpr int kPiece = 16 / sizeof(E);  // elements a 16-byte copy
  extern __shared__ float4 smem_f4[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem_f4);
  const int b = int(blockIdx.x), h = int(blockIdx.y);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t4 = lane % 4;
  const int part = warp / kGroups, group = warp % kGroups, vw = 16 * group;  // first value column in the block
  const int j0 = int(blockIdx.z) * kW;                                        // the block's first column of dv
  const SeqView s = sequence_view(a.cu, a.state_slots, a.snaps, a.snap_width, b, a.T, a.slots);
  if (!s.ok || s.n <= 1 || s.snap) return;  // the recurrent kernel's sequences
  // kHeadDim: the key and value head dims known when compiled (the Qwen models' 128), or 0.
  const int dk = kHeadDim ? kHeadDim : a.dk, dv = kHeadDim ? kHeadDim : a.dv, Hv = a.Hv;
  const int dvp = decltype(cs)::dvp(dv);
  const int64_t vd = int64_t(Hv) * dv;
  const StateSmem L(dk, kW, kKs, sizeof(E));
  const int dkp = L.dkp, lw = L.lw, lk = L.lk, lu = L.lu, ls = L.ls, lv = L.lv;
  const int tiles = kHeadDim ? (kHeadDim + 15) / 16 * 2 : dkp / 8;  // 8-key tiles of the state
  const int kt0 = part * kTiles;                                      // the part's first
  const int r0 = part * kRows;                                        // the part's first 8-row tile
  E* Qp = reinterpret_cast<E*>(smem + L.Qp);
  E* Ws = reinterpret_cast<E*>(smem + L.Ws);
  E* Us = reinterpret_cast<E*>(smem + L.Us);
  E* Os = reinterpret_cast<E*>(smem + L.Os);
  E* Ss = reinterpret_cast<E*>(smem + L.Ss) + group * 16 * ls;  // the group's S0^T [16][ls]
  E* Vs = reinterpret_cast<E*>(smem + L.Vs) + group * 16 * lv;  // the group's V'^T [16][lv]
  const auto kp_of = [&](int64_t c0) {
    return reinterpret_cast<E*>(smem + L.Kp) + ((c0 / kChunk) & 1) * (int64_t(kChunk) * lk);
  };

  // A chunk's rows of [T, Hv, dkp] scratch into [kChunk][ld] shared memory (zeros past n); its
  // slice of kW columns from j0 of [T, Hv, dvp] scratch (zeros past n and dvp). The chunk's first
  // row's address once, then 32-bit offsets a piece (a thread copies the same pieces each chunk).
  // Not unrolled: unrolled, the offsets of every piece stay in registers and the fp32 kernels spill.
  const int pieces = dkp / kPiece, row_stride = Hv * dkp, slice_stride = Hv * dvp;
  constexpr int kRowCopies = (kChunk * (kMaxDk / kPiece) + kThreads - 1) / kThreads;
  constexpr int kSliceCopies = (kChunk * (kW / kPiece) + kThreads - 1) / kThreads;
  const auto rows_async = [&](E* dst, int ld, const E* src, int64_t tc, int n) {
    const E* base = src + (tc * Hv + h) * dkp;
#pragma unroll 1
    for (int r = 0; r < kRowCopies; ++r) {
      const int e = int(threadIdx.x) + kThreads * r, i = e / pieces, q = kPiece * (e % pieces);
      if (i < kChunk) cp_async16(dst + i * ld + q, base + (i < n ? i * row_stride + q : 0), i < n);
    }
  };
  const auto slice_async = [&](E* dst, const E* src, int64_t tc, int n) {
    const E* base = src + (tc * Hv + h) * dvp + j0;
#pragma unroll 1
    for (int r = 0; r < kSliceCopies; ++r) {
      const int e = int(threadIdx.x) + kThreads * r, i = e / (kW / kPiece), q = kPiece * (e % (kW / kPiece));
      const bool ok = i < n && j0 + q < dvp;
      if (i < kChunk) cp_async16(dst + i * lu + q, base + (ok ? i * slice_stride + q : 0), ok);
    }
  };
  const auto chunk_rows = [&](int64_t c0) { return int(std::min<int64_t>(kChunk, s.n - c0)); };
  const auto issue_step1_part = [&](int64_t c0) {  // what step 1 of chunk c0 reads
    const int64_t tc = s.t0 + c0;
    const int n = chunk_rows(c0);
    rows_async(Qp, lw, cs.qp, tc, n);
    rows_async(Ws, lw, cs.w, tc, n);
    slice_async(Us, cs.u, tc, n);
    slice_async(Os, cs.o, tc, n);
    cp_async_commit();
  };
  const auto issue_step2_part = [&](int64_t c0) {  // what step 2 of chunk c0 reads
    rows_async(kp_of(c0), lk, cs.kp, s.t0 + c0, chunk_rows(c0));
    cp_async_commit();
  };

  // st[i][e]: S[key 8 (kt0 + i) + 2 t4 + (e & 1)][value j0 + vw + g + 8 (e >> 1)]
  float st[kTiles][4];
  float* state = a.states + (int64_t(s.slot) * Hv + h) * dk * dv;
  const auto state_at = [&](int i, int e, int& key, int& v) {
    key = 8 * (kt0 + i) + 2 * t4 + (e & 1);
    v = j0 + vw + g + 8 * (e >> 1);
    return kt0 + i < tiles && key < dk && v < dv;
  };
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int key, v;
      st[i][e] = state_at(i, e, key, v) ? state[int64_t(key) * dv + v] : 0.0f;
    }
  // 3xTF32 / TF32: an A operand (8 k) from one accumulator tile as it lies (c0, c1 at row g, c2, c3
  // at row g + 8; the k relabelled as above), from this warp's registers or, where another part
  // holds the tile, from the group's copy in shared memory (`at`: its row g, column 2t; rows `ld`
  // apart).
  const auto tf32_a = [&](Tf32Pair(&af)[4], float c0, float c1, float c2, float c3) {
    af[0] = tf(c0), af[1] = tf(c2), af[2] = tf(c1), af[3] = tf(c3);
  };
  const auto shared_tf32_a = [&](Tf32Pair(&af)[4], const E* at, int ld) {
    const float2 lo = load2(at), hi = load2(at + 8 * ld);
    tf32_a(af, lo.x, lo.y, hi.x, hi.y);
  };
  // The part's keys of S0^T into the group's Ss, as the operand it is (rows g, g + 8, columns 2t,
  // 2t + 1 of each key tile: the accumulators as they lie). Read by step 1 after the next barrier.
  const auto share_state = [&] {
    if constexpr (kKs > 1) {
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        if (kt0 + i >= tiles) break;
        E* p = Ss + g * ls + 8 * (kt0 + i) + 2 * t4;
        store2(p, st[i][0], st[i][1]);
        store2(p + 8 * ls, st[i][2], st[i][3]);
      }
    }
  };
  share_state();
  issue_step1_part(0);
  issue_step2_part(0);

  for (int64_t c0 = 0; c0 < s.n; c0 += kChunk) {
    const int n = chunk_rows(c0);
    const int64_t tc = s.t0 + c0;
    const bool more = c0 + kChunk < s.n;
    const float elast = cs.elast[tc * Hv + h];  // asked for here, used in step 2
    cp_async_wait_all();  // both parts of this chunk (in this thread) ...
    __syncthreads();      // ... and in every thread; S0^T shared; every warp is past the step 2 before
    if (more) issue_step2_part(c0 + kChunk);  // into the other K'

    // --- 1. x = (Q' S0)^T, u = (W S0)^T over every key for the part's rows: 16 value rows x 64 /
    // kKs chunk rows each; x[j][e], u[j][e] at value column vw + g + 8 (e >> 1) of the block and
    // row 8 (r0 + j) + 2 t4 + (e & 1) of the chunk ---
    float x[kRows][4] = {}, u[kRows][4] = {};
    if constexpr (kSplit) {
#pragma unroll
      for (int kt = 0; kt < kMaxDk / 8; ++kt) {
        if (kt >= tiles) break;
        Tf32Pair af[4];
        if constexpr (kKs == 1) tf32_a(af, st[kt][0], st[kt][1], st[kt][2], st[kt][3]);
        else shared_tf32_a(af, Ss + g * ls + 8 * kt + 2 * t4, ls);
        const float* q = Qp + (8 * r0 + g) * lw + 8 * kt + 2 * t4;
        const float* w = Ws + (8 * r0 + g) * lw + 8 * kt + 2 * t4;
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const float2 qv = *reinterpret_cast<const float2*>(q + 8 * j * lw);
          const float2 wv = *reinterpret_cast<const float2*>(w + 8 * j * lw);
          const Tf32Pair bq[2] = {tf(qv.x), tf(qv.y)}, bw[2] = {tf(wv.x), tf(wv.y)};
          mma_tf32x<kSplit>(x[j], af, bq);
          mma_tf32x<kSplit>(u[j], af, bw);
        }
      }
    } else {
      // bf16: S0^T's key tiles kt, kt + 1 as one A operand (from the group's Ss by ldmatrix, or the
      // warp's own accumulators where it holds every key); the B fragments of Q'^T and W^T (two
      // 8-row blocks of the chunk an ldmatrix) from their rows, which are the products' n.
      const int at = (8 * r0 + 8 * (lane / 16) + lane % 8) * lw + 8 * ((lane / 8) % 2);
      const E* sa = Ss + (lane % 16) * ls + 8 * (lane / 16);
      // With 2 or 4 parts a warp's chain is 8 dependent k-steps over 4 or 8 accumulators (latency
      // bound): alternate k-steps go to a second set (x2, u2), added after the loop. Not at 1 part:
      // its 8 row tiles already give 16 independent accumulators, and a second set took ~250
      // registers (session 49).
      constexpr bool kTwoSets = kKs > 1;
      float x2[kRows][4] = {}, u2[kRows][4] = {};
#pragma unroll
      for (int kt = 0; kt < kMaxDk / 8; kt += 2) {
        if (kt >= tiles) break;
        uint32_t af[4];
        if constexpr (kKs == 1) accumulators_as_a(st, kt, af);
        else ldmatrix_x4(af, sa + 8 * kt);
        const bool second = kTwoSets && (kt / 2) % 2;
        float(&xs)[kRows][4] = second ? x2 : x;
        float(&us)[kRows][4] = second ? u2 : u;
#pragma unroll
        for (int j = 0; j < kRows; j += 2) {
          uint32_t qf[4], wf[4];
          ldmatrix_x4(qf, Qp + at + 8 * j * lw + 8 * kt);
          ldmatrix_x4(wf, Ws + at + 8 * j * lw + 8 * kt);
          mma_bf16(xs[j], af, qf[0], qf[1]);
          mma_bf16(xs[j + 1], af, qf[2], qf[3]);
          mma_bf16(us[j], af, wf[0], wf[1]);
          mma_bf16(us[j + 1], af, wf[2], wf[3]);
        }
      }
      if constexpr (kTwoSets) {
#pragma unroll
        for (int j = 0; j < kRows; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) x[j][e] += x2[j][e], u[j][e] += u2[j][e];
      }
    }
    // out = x + O and V'^T = U - u over the part's rows. bf16: O and U by ldmatrix.trans (matrix m
    // of an x4: the chunk's rows 8 (r0 + j + m / 2) .., the warp's columns 8 (m % 2) ..; a lane gets
    // rows 2t, 2t + 1 of column g, as x and u lie).
    if constexpr (kSplit) {
#pragma unroll
      for (int j = 0; j < kRows; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 8 * (r0 + j) + 2 * t4 + (e & 1), c = vw + g + 8 * (e >> 1);
          x[j][e] += Os[i * lu + c];
          u[j][e] = Us[i * lu + c] - u[j][e];
        }
    } else {
      const int at = (8 * r0 + 8 * (lane / 16) + lane % 8) * lu + vw + 8 * ((lane / 8) % 2);
#pragma unroll
      for (int j = 0; j < kRows; j += 2) {
        uint32_t of[4], uf[4];
        ldmatrix_x4_trans(of, Os + at + 8 * j * lu);
        ldmatrix_x4_trans(uf, Us + at + 8 * j * lu);
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const float2 o = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&of[m]));
          const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&uf[m]));
          float(&xj)[4] = x[j + m / 2];
          float(&uj)[4] = u[j + m / 2];
          const int e = 2 * (m % 2);
          xj[e] += o.x, xj[e + 1] += o.y;
          uj[e] = v.x - uj[e], uj[e + 1] = v.y - uj[e + 1];
        }
      }
    }
    // The part's rows of V'^T into the group's Vs (rows g, g + 8; columns 2t, 2t + 1 of each row
    // tile: as they lie), for every part's step 2 after the next barrier.
    if constexpr (kKs > 1) {
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        E* p = Vs + g * lv + 8 * (r0 + j) + 2 * t4;
        store2(p, u[j][0], u[j][1]);
        store2(p + 8 * lv, u[j][2], u[j][3]);
      }
    }
    __syncthreads();  // Q', W, U and O read; V'^T shared
    if (more) issue_step1_part(c0 + kChunk);
#pragma unroll
    for (int j = 0; j < kRows; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 8 * (r0 + j) + 2 * t4 + (e & 1), c = vw + g + 8 * (e >> 1);
        if (i < n && j0 + c < dv) a.out[(tc + i) * vd + int64_t(h) * dv + j0 + c] = x[j][e];
      }

    // --- 2. S^T = e^{gc_last} S0^T + V'^T K' over the part's keys (rows past n: zeros in both) ---
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] *= elast;
    if constexpr (kSplit) {
      const float* kp = kp_of(c0) + 2 * t4 * lk + 8 * kt0 + g;
#pragma unroll
      for (int mj = 0; mj < 8; ++mj) {
        Tf32Pair af[4];
        if constexpr (kKs == 1) tf32_a(af, u[mj][0], u[mj][1], u[mj][2], u[mj][3]);
        else shared_tf32_a(af, Vs + g * lv + 8 * mj + 2 * t4, lv);
        const float* km = kp + 8 * mj * lk;
#pragma unroll
        for (int i = 0; i < kTiles; ++i) {
          if (kt0 + i >= tiles) break;
          const Tf32Pair bf[2] = {tf(km[8 * i]), tf(km[lk + 8 * i])};
          mma_tf32x<kSplit>(st[i], af, bf);
        }
      }
    } else {
      // bf16: V'^T's row blocks mj, mj + 1 of the chunk as one A operand; the B fragments of K'
      // (two 8-key tiles an ldmatrix) from its rows, which are the product's k: transposed.
      const __nv_bfloat16* kp = kp_of(c0) + (8 * ((lane / 8) % 2) + lane % 8) * lk + 8 * (lane / 16) + 8 * kt0;
      const E* va = Vs + (lane % 16) * lv + 8 * (lane / 16);
#pragma unroll
      for (int mj = 0; mj < 8; mj += 2) {
        uint32_t af[4];
        if constexpr (kKs == 1) accumulators_as_a(u, mj, af);
        else ldmatrix_x4(af, va + 8 * mj);
#pragma unroll
        for (int i = 0; i < kTiles; i += 2) {
          if (kt0 + i >= tiles) break;
          uint32_t kf[4];
          ldmatrix_x4_trans(kf, kp + 8 * mj * lk + 8 * i);
          mma_bf16(st[i], af, kf[0], kf[1]);
          mma_bf16(st[i + 1], af, kf[2], kf[3]);
        }
      }
    }
    if (more) share_state();  // read after the next chunk's first barrier
  }
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int key, v;
      if (state_at(i, e, key, v)) state[int64_t(key) * dv + v] = st[i][e];
    }
}

// dst[i] = src[i] in another element type (the delta rule's rows where the solve kernel reads the
// other type), rounded to nearest.
template <typename From, typename To>
__global__ void convert_rows_kernel(const From* src, To* dst, int64_t n) {
  wait_for_prior_kernels();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    store_row_element(dst + i, load_after_wait(src + i));
}

// The sequences of a pass (their shapes checked by the contract's checks, their contents on the
// device): in CUDA memory, snapshot tables of a width the kernels index in 32 bits.
void check_sequences(const char* op, const SeqLayout& layout) {
  expect_device(op, "cu_seqlens", layout.cu_seqlens);
  expect_device(op, "state_slots", layout.state_slots);
  if (layout.snapshot_slots.defined()) {
    expect_device(op, "snapshot_slots", layout.snapshot_slots);
    check(layout.snapshot_slots.dim(1) >= 0 && layout.snapshot_slots.dim(1) <= std::numeric_limits<int32_t>::max(),
          "{}: snapshot_slots {}", op, layout.snapshot_slots);
  }
}

}  // namespace

void CudaOps::causal_conv1d_silu(const Tensor& x, const Tensor& weight, Tensor& states, const SeqLayout& layout,
                                 Tensor& out) {
  auto timed = time_op("causal_conv1d_silu");
  const ConvShape shape = check_causal_conv1d_silu(x, weight, states, layout, out);
  expect_device("causal_conv1d_silu", "x", x);
  expect_device("causal_conv1d_silu", "weight", weight);
  expect_device("causal_conv1d_silu", "states", states);
  expect_device("causal_conv1d_silu", "out", out);
  const int B = shape.B;
  if (B == 0) return;
  const int64_t T = shape.T, C = shape.C, kc = shape.kc;
  check_sequences("causal_conv1d_silu", layout);
  const int64_t channel_blocks = cdiv(C, kConvThreads);
  const int64_t pieces = std::max<int64_t>(cdiv(layout.max_query_len, kConvRows), 1);
  check(C <= std::numeric_limits<int32_t>::max() && states.dim(0) <= std::numeric_limits<int32_t>::max() &&
            channel_blocks * B <= std::numeric_limits<int32_t>::max() && pieces <= 65535,
        "causal_conv1d_silu: {} sequences of up to {} rows over {} channels is too many", B, layout.max_query_len, C);
  if (T == 0) return;
  ConvArgs a{};
  a.x = f32(x);
  a.weight = f32(weight);
  a.states = f32_mut(states);
  a.out = out.raw();
  a.cu = i32(layout.cu_seqlens);
  a.state_slots = i32(layout.state_slots);
  a.snaps = layout.snapshot_slots.defined() ? i32(layout.snapshot_slots) : nullptr;
  a.snap_width = layout.snapshot_slots.defined() ? int(layout.snapshot_slots.dim(1)) : 0;
  a.B = B;
  a.C = int(C);
  a.kc = int(kc);
  a.slots = int(states.dim(0));
  a.channel_blocks = int(channel_blocks);
  a.T = T;
  const dim3 grid{unsigned(channel_blocks * B), unsigned(pieces)};
  const bool bf16 = out.dtype() == DType::BF16;
  if (kc <= 4 && bf16) launch(conv1d_silu_kernel<4, __nv_bfloat16>, grid, kConvThreads, 0, stream_, a);
  else if (kc <= 4) launch(conv1d_silu_kernel<4, float>, grid, kConvThreads, 0, stream_, a);
  else if (bf16) launch(conv1d_silu_kernel<16, __nv_bfloat16>, grid, kConvThreads, 0, stream_, a);
  else launch(conv1d_silu_kernel<16, float>, grid, kConvThreads, 0, stream_, a);
  check_launch("causal_conv1d_silu");
}

void CudaOps::gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta, const DeltaRuleDims& d,
                               Tensor& states, const SeqLayout& layout, Tensor& out) {
  auto timed = time_op(layout.max_query_len > 1 ? "gated_delta_rule chunked" : "gated_delta_rule recurrent");
  const GatedDeltaRuleShape shape = check_gated_delta_rule(qkv, g, beta, d, states, layout, out);
  check(d.dk <= kMaxDk, "gated_delta_rule: key head dim {} > {}", d.dk, kMaxDk);
  expect_device("gated_delta_rule", "qkv", qkv);
  expect_device("gated_delta_rule", "g", g);
  expect_device("gated_delta_rule", "beta", beta);
  expect_device("gated_delta_rule", "states", states);
  expect_device("gated_delta_rule", "out", out);
  const int B = shape.B;
  if (B == 0) return;
  const int64_t T = shape.T;
  check_sequences("gated_delta_rule", layout);
  check(d.Hv <= 65535 && states.dim(0) <= std::numeric_limits<int32_t>::max(),
        "gated_delta_rule: {} value heads, {} slots", d.Hv, states.dim(0));
  if (T == 0) return;

  RuleArgs a{};
  const bool rows16 = qkv.dtype() == DType::BF16;
  if (rows16) a.qkv16 = static_cast<const __nv_bfloat16*>(qkv.raw());
  else a.qkv = f32(qkv);
  a.g = f32(g);
  a.beta = f32(beta);
  a.states = f32_mut(states);
  a.out = f32_mut(out);
  a.cu = i32(layout.cu_seqlens);
  a.state_slots = i32(layout.state_slots);
  a.snaps = layout.snapshot_slots.defined() ? i32(layout.snapshot_slots) : nullptr;
  a.snap_width = layout.snapshot_slots.defined() ? int(layout.snapshot_slots.dim(1)) : 0;
  a.ld = qkv.dim(1);
  a.T = T;
  a.B = B;
  a.Hk = d.Hk;
  a.Hv = d.Hv;
  a.dk = d.dk;
  a.dv = d.dv;
  a.slots = int(states.dim(0));
  const dim3 grid{unsigned(B), unsigned(d.Hv), unsigned(cdiv(d.dv, kSlice))};

  // Single rows and verifying sequences: the recurrence.
  const int rpt = int(cdiv(d.dk, kRecWarps));
  const auto recurrent = [&](auto row) {
    using Row = decltype(row);
    if (rpt <= 4) launch(delta_rule_recurrent_kernel<4, Row>, grid, kRecWarps * 32, 0, stream_, a);
    else if (rpt <= 8) launch(delta_rule_recurrent_kernel<8, Row>, grid, kRecWarps * 32, 0, stream_, a);
    else if (rpt <= 16) launch(delta_rule_recurrent_kernel<16, Row>, grid, kRecWarps * 32, 0, stream_, a);
    else launch(delta_rule_recurrent_kernel<32, Row>, grid, kRecWarps * 32, 0, stream_, a);
  };
  if (rows16) recurrent(__nv_bfloat16{});
  else recurrent(float{});
  check_launch("gated_delta_rule: recurrent");

  // The other sequences of more than one row: the chunked form, every chunk's solve at once, then
  // the chunks of each sequence in order.
  if (layout.max_query_len > 1) {
    const int64_t chunks_per_seq = cdiv(layout.max_query_len, kChunk);
    check(chunks_per_seq * B <= std::numeric_limits<int32_t>::max(), "gated_delta_rule: {} sequences of up to {} rows",
          B, layout.max_query_len);
    // (the state kernel's copies offset a chunk's rows of scratch in 32 bits)
    check(int64_t(kChunk) * d.Hv * std::max<int64_t>(padded_dk(d.dk), d.dv + 8) <= std::numeric_limits<int32_t>::max(),
          "gated_delta_rule: {} value heads of {} columns is too many for the chunked form", d.Hv, d.dv);
    // The state kernel's slices, 8 warps a block: 32 columns (2 groups of value columns x 4 parts
    // of the keys and rows) where those blocks fit on the SMs in one wave (one block an SM, below),
    // else 64 (4 groups x 2 parts) where those do, else 128 (8 groups, all keys and rows each): a
    // block's Q', W and K' loads serve all its warps (two 32-column blocks an SM were slower than
    // one of 64: the op 1.062 -> 1.172 ms at 397B 1 x 8192 on an H100).
    const int64_t prefills = layout.prefill_seqs >= 0 ? layout.prefill_seqs : B;
    const auto blocks = [&](int width) { return prefills * d.Hv * cdiv(d.dv, width); };
    const int sms = device_.sms;
    const int width = blocks(32) <= sms ? 32 : blocks(64) <= sms ? 64 : 128;
    const int parts = 128 / width;  // 8 warps of 16 columns each
    const dim3 state_grid{unsigned(B), unsigned(d.Hv), unsigned(cdiv(d.dv, width))};
    const auto run = [&](const RuleArgs& ca, auto solve_kernel, size_t solve_smem, auto state_kernel, auto cs) {
      // One block an SM: where two would fit (bf16 at 32 columns), the blocks launched early (PDL)
      // onto the SMs the solve kernel leaves first pair up there while other SMs idle (the op at
      // 80B 1 x 8192 on an H100: 0.757 ms so, 0.649 with PDL off), so a block asks for more than
      // half of an SM's shared memory.
      const size_t state_smem = std::max(StateSmem(d.dk, width, parts, sizeof(*cs.qp)).bytes(),
                                         std::min(device_.smem_per_sm / 2 + 1, device_.smem_optin));
      smem_.allow(solve_kernel, solve_smem, "gated_delta_rule: shared memory of the solve kernel");
      smem_.allow(state_kernel, state_smem, "gated_delta_rule: shared memory of the state kernel");
      launch(solve_kernel, dim3{unsigned(chunks_per_seq * B), unsigned(d.Hv)}, kChunkThreads, solve_smem, stream_, ca,
             cs, int(chunks_per_seq));
      check_launch("gated_delta_rule: chunk solve");
      launch(state_kernel, state_grid, 32 * (width / 16) * parts, state_smem, stream_, ca, cs);
    };
    // Products in 3xTF32 over fp32 scratch (fp32 accuracy) unless bf16 products are asked for:
    // then both kernels' in bf16 over bf16 scratch (T's inverse in 3xTF32 still). The kernels
    // compiled for the Qwen models' head dims (dk = dv = 128) where they are those. The solve
    // kernel reads rows of its products' type (fp32 rows with 3xTF32, bf16 ones with bf16); rows of
    // the other type (not what the model gives: delta_rule_rows_dtype) are converted into scratch
    // first.
    const auto run_in = [&](auto split, auto dims) {
      constexpr bool kSplit = decltype(split)::value;
      constexpr int kDims = decltype(dims)::value;
      using Scratch = ChunkScratch<ScratchOf<kSplit>>;
      const size_t scratch_bytes = cdiv(Scratch::bytes(T, d.Hv, d.dk, d.dv), 256) * 256;
      const bool convert = rows16 == kSplit;
      unsigned char* base = static_cast<unsigned char*>(
          scratch_->bytes(scratch_bytes + (convert ? size_t(qkv.numel()) * sizeof(ScratchOf<kSplit>) : 0)));
      const Scratch cs = Scratch::at(base, T, d.Hv, d.dk, d.dv);
      RuleArgs ca = a;
      if (convert) {
        using SolveRow = ScratchOf<kSplit>;  // the solve kernel reads rows of its scratch's type
        using GivenRow = std::conditional_t<kSplit, __nv_bfloat16, float>;
        SolveRow* rows = reinterpret_cast<SolveRow*>(base + scratch_bytes);
        const unsigned blocks = std::min<unsigned>(blocks_for(qkv.numel(), 256), 8u * unsigned(device_.sms));
        launch(convert_rows_kernel<GivenRow, SolveRow>, blocks, 256, 0, stream_,
               static_cast<const GivenRow*>(qkv.raw()), rows, qkv.numel());
        check_launch("gated_delta_rule: rows converted for the solve kernel");
        ca.qkv = nullptr, ca.qkv16 = nullptr;
        if constexpr (kSplit) ca.qkv = rows;
        else ca.qkv16 = rows;
      }
      const auto solve = [&] {
        if constexpr (kSplit) return delta_rule_solve_kernel<kDims>;
        else return delta_rule_solve_bf16_kernel<kDims>;
      }();
      const size_t solve_smem = kSplit ? SolveSmem(d.dk, d.dv).bytes() : SolveBf16Smem(d.dk, d.dv).bytes();
      if (width == 32) run(ca, solve, solve_smem, delta_rule_state_kernel<kSplit, 2, 4, kDims>, cs);
      else if (width == 64) run(ca, solve, solve_smem, delta_rule_state_kernel<kSplit, 4, 2, kDims>, cs);
      else run(ca, solve, solve_smem, delta_rule_state_kernel<kSplit, 8, 1, kDims>, cs);
    };
    using Dims128 = std::integral_constant<int, 128>;
    using AnyDims = std::integral_constant<int, 0>;
    const bool dims128 = d.dk == 128 && d.dv == 128;
    if (bf16_matmul_ && dims128) run_in(std::false_type{}, Dims128{});
    else if (bf16_matmul_) run_in(std::false_type{}, AnyDims{});
    else if (dims128) run_in(std::true_type{}, Dims128{});
    else run_in(std::true_type{}, AnyDims{});
    check_launch("gated_delta_rule: chunked");
  }
}

}  // namespace ballast::kernels
