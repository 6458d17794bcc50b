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
//   (block: chunk, value head) and leaves what does not depend on S0 in scratch (ChunkScratch:
//   W, U, Q' = e^gc Q - P W, O_local = P U, K' = e^{gc_last - gc} K); the state kernel then takes
//   the chunks of each sequence in order (block: sequence, value head, column slice) and only
//   applies S0: V' = U - W S0, O = O_local + Q' S0, S = e^{gc_last} S0 + K'^T V' (slices of 32
//   columns, or 64 where the prefills' blocks of 32 outnumber the SMs). The products
//   run on the tensor cores in 3xTF32 (cuda_mma_support.cuh: fp32 accuracy), or in TF32 (operands
//   rounded to 10 bits, one product for three) under bf16 matrix products; the substitution and
//   the exponentials (of double differences, as the CPU) on the SIMT cores.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

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

struct ConvArgs {
  const float* x;       // [T, C]
  const float* weight;  // [C, kc]
  float* states;        // [slots, C, kc-1]
  float* out;           // [T, C]
  const int32_t* cu;
  const int32_t* state_slots;
  const int32_t* snaps;
  int snap_width, B, C, kc, slots, channel_blocks;
  int64_t T;
};

// KMAX >= kc: taps and history are right-aligned in arrays of KMAX (static indices: registers).
template <int KMAX>
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
  for (int64_t r = r0; r < r1; ++r) {
    const float xin = x[r * C];
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < KMAX - 1; ++j) acc += wt[j] * hist[j];
    acc += wt[KMAX - 1] * xin;
    a.out[(s.t0 + r) * C + c] = acc / (1.0f + expf(-acc));
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
  const float* qkv;  // [T, ld]: [Q (Hk dk) | K (Hk dk) | V (Hv dv)]
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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Row t's q (scaled by dk^-0.5) and k, each L2-normalised, read by one warp: element lane + 32 m
// in [m], zero past dk. The recurrent kernel and the chunk solve read their rows through it.
__device__ __forceinline__ void normalized_qk(const RuleArgs& a, int64_t t, int hk, int lane, float (&q)[kMaxDk / 32],
                                              float (&k)[kMaxDk / 32]) {
  const int dk = a.dk;
  const float* qrow = a.qkv + t * a.ld + int64_t(hk) * dk;
  const float* krow = qrow + int64_t(a.Hk) * dk;
  float ssq = 0.0f, ssk = 0.0f;
#pragma unroll
  for (int m = 0; m < kMaxDk / 32; ++m) {
    const int p = lane + 32 * m;
    q[m] = p < dk ? qrow[p] : 0.0f;
    k[m] = p < dk ? krow[p] : 0.0f;
    ssq += q[m] * q[m];
    ssk += k[m] * k[m];
  }
  ssq = warp_sum(ssq);
  ssk = warp_sum(ssk);
  const float fq = (1.0f / sqrtf(float(dk))) / sqrtf(ssq + kL2Eps), fk = 1.0f / sqrtf(ssk + kL2Eps);
#pragma unroll
  for (int m = 0; m < kMaxDk / 32; ++m) {
    q[m] *= fq;
    k[m] *= fk;
  }
}

// Recurrent form. Block (sequence, value head, column slice); RPT >= ceil(dk / kRecWarps) rows of the
// state per thread: rows p = warp + kRecWarps * r.
template <int RPT>
__global__ void __launch_bounds__(kRecWarps * 32) delta_rule_recurrent_kernel(const RuleArgs a) {
  wait_for_prior_kernels();
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
  for (int64_t i = 0; i < s.n; ++i) {
    const int64_t t = s.t0 + i;
    // Normalised q and k, every warp for itself.
    __syncwarp();
    float qv[kMaxDk / 32], kv[kMaxDk / 32];
    normalized_qk(a, t, hk, lane, qv, kv);
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
    const float v = col ? a.qkv[t * a.ld + 2 * kd + int64_t(h) * dv + j] : 0.0f;
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

// The chunk's rows in shared memory: normalised q (scaled by dk^-0.5) and k in Qs, Ks [kChunk][lq]
// (zeros past n and dk); beta; the cumulative log decay gc (double) with eg = e^gc and ef =
// e^{gc_last - gc}. Rows past n repeat the last decay with beta = 0: they change nothing.
__device__ void load_chunk_rows(const RuleArgs& a, int64_t tc, int n, int h, int lq, int dkp, float* Qs, float* Ks,
                                double* gc, float* betas, float* eg, float* ef) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int Hv = a.Hv, hk = h / (Hv / a.Hk);
  for (int i = warp; i < kChunk; i += kChunkWarps) {
    if (i < n) {
      float qv[kMaxDk / 32], kv[kMaxDk / 32];
      normalized_qk(a, tc + i, hk, lane, qv, kv);
#pragma unroll
      for (int m = 0; m < kMaxDk / 32; ++m) {
        const int p = lane + 32 * m;
        if (p < dkp) {  // zeros in [dk, dkp)
          Qs[i * lq + p] = qv[m];
          Ks[i * lq + p] = kv[m];
        }
      }
    } else {
      for (int p = lane; p < dkp; p += 32) Qs[i * lq + p] = Ks[i * lq + p] = 0.0f;
    }
  }
  if (warp == 0) {
    // Inclusive scan of g in double over the chunk's rows (lane holds rows lane and 32 + lane).
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
    gc[lane] = c0v;
    gc[32 + lane] = c1v;
    betas[lane] = lane < n ? a.beta[(tc + lane) * Hv + h] : 0.0f;
    betas[32 + lane] = 32 + lane < n ? a.beta[(tc + 32 + lane) * Hv + h] : 0.0f;
    eg[lane] = float(exp(c0v));
    eg[32 + lane] = float(exp(c1v));
    ef[lane] = float(exp(glast - c0v));
    ef[32 + lane] = float(exp(glast - c1v));
  }
}

// The key dim padded with zeros to whole 8-wide tensor-core steps.
__host__ __device__ inline int padded_dk(int dk) { return (dk + 7) / 8 * 8; }

// What the solve kernel leaves for the state kernel, per row t of the pass and value head h (rows
// of dkp and dv4 floats, zero-padded: whole float4s for cp.async): with T = (I + A)^-1 of the row's
// chunk, W = T diag(beta e^gc) K, U = T diag(beta) V, Q' = diag(e^gc) Q - P W, O = P U, K' =
// diag(e^{gc_last - gc}) K; and e^{gc_last} at the chunk's first row. The state kernel then does
// only what depends on the state entering the chunk:
//   V' = U - W S0,   out = O + Q' S0,   S = e^{gc_last} S0 + K'^T V'
struct ChunkScratch {
  float *qp, *w, *kp;  // [T, Hv, dkp]
  float *u, *o;        // [T, Hv, dv4]
  float* elast;        // [T, Hv]
  static size_t floats(int64_t T, int Hv, int dk, int dv) {
    return size_t(T) * Hv * (3 * size_t(padded_dk(dk)) + 2 * size_t(round4(dv)) + 1);
  }
  static ChunkScratch at(float* base, int64_t T, int Hv, int dk, int dv) {
    const int64_t mk = T * Hv * padded_dk(dk), mv = T * Hv * round4(dv);
    return {base, base + mk, base + 2 * mk, base + 3 * mk, base + 3 * mk + mv, base + 3 * mk + 2 * mv};
  }
  __host__ __device__ static int round4(int x) { return (x + 3) / 4 * 4; }
};

// Row strides of the chunks' rows: padded_dk + 4, so that lq / 4 is odd (8 consecutive rows read as
// float4 at one column cover the 32 banks once, as do a warp's A fragments of mma: 4 g + t).
__host__ __device__ inline int chunk_lq(int dk) { return padded_dk(dk) + 4; }

// Shared memory of the solve kernel, in floats (gc first: doubles). Z, the right-hand sides and then
// the solutions [kChunk][dk + dv], overlays Qs and Ks once P and A are formed; PT is P transposed.
struct SolveSmem {
  int zl;  // row stride of Z: the columns rounded up to the 64 a warp's P Z step reads, plus 8 (B
           // operand loads, k t at column g, on 32 banks)
  int64_t gc, beta, eg, ef, X, PT, Qs, Ks, Z, total;
  __host__ __device__ SolveSmem(int dk, int dv) {
    zl = (dk + dv + 63) / 64 * 64 + 8;
    const int lq = chunk_lq(dk);
    int64_t o = 0;
    gc = o, o += 2 * kChunk;
    beta = o, o += kChunk;
    eg = o, o += kChunk;
    ef = o, o += kChunk;
    X = o, o += int64_t(kChunk) * kLX;
    PT = o, o += int64_t(kChunk) * kLX;
    Qs = o, o += int64_t(kChunk) * lq;
    Ks = o, o += int64_t(kChunk) * lq;
    Z = Qs;
    const int64_t z_end = Z + int64_t(kChunk) * zl;
    total = o > z_end ? o : z_end;
  }
  __host__ __device__ size_t bytes() const { return size_t(total) * sizeof(float); }
};

// Chunked form, part 1, every chunk at once: block (chunk, value head), 8 warps. Forms P (PT) and
// A (the strictly lower triangle of X); writes K' and e^gc Q; solves (I + A) Z = [diag(beta e^gc) K
// | diag(beta) V] for Z = [W | U], a column of Z per thread in shared memory (right-looking, 4 rows
// of A, one float4 of X, a step); then P Z by columns: Q' = e^gc Q - P W and O = P U.
template <bool kSplit>
__global__ void __launch_bounds__(kChunkThreads, 2) delta_rule_solve_kernel(const RuleArgs a, ChunkScratch cs,
                                                                            int chunks_per_seq) {
  wait_for_prior_kernels();
  const auto tf = [](float v) { return tf32_operand<kSplit>(v); };  // an operand of the products
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int b = int(blockIdx.x) / chunks_per_seq, c = int(blockIdx.x) % chunks_per_seq, h = int(blockIdx.y);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t4 = lane % 4;
  if (b >= a.B) return;
  const SeqView s = sequence_view(a.cu, a.state_slots, a.snaps, a.snap_width, b, a.T, a.slots);
  if (!s.ok || s.n <= 1 || s.snap) return;  // the recurrent kernel's sequences
  const int64_t c0 = int64_t(c) * kChunk;
  if (c0 >= s.n) return;
  const int n = int(s.n - c0 < kChunk ? s.n - c0 : kChunk);
  const int64_t tc = s.t0 + c0;
  const int dk = a.dk, dv = a.dv, Hv = a.Hv, lq = chunk_lq(dk), dkp = padded_dk(dk);
  const int dv4 = ChunkScratch::round4(dv);
  const SolveSmem L(dk, dv);
  double* gc = reinterpret_cast<double*>(smem + L.gc);
  float* betas = smem + L.beta;
  float* eg = smem + L.eg;
  float* ef = smem + L.ef;
  float* X = smem + L.X;    // A in the strictly lower triangle
  float* PT = smem + L.PT;  // PT[j][i] = P_ij (zero past the lower triangle)
  float* Qs = smem + L.Qs;  // [kChunk][lq]
  float* Ks = smem + L.Ks;
  load_chunk_rows(a, tc, n, h, lq, dkp, Qs, Ks, gc, betas, eg, ef);
  __syncthreads();

  // P_ij = D_ij (q_i . k_j) (j <= i) and A_ij = beta_i D_ij (k_i . k_j) (j < i) on the tensor cores:
  // warp w has rows 16 (w % 4) .. + 15 and columns 32 (w / 4) .. + 31 of both (B = K^T: (k t, n g) is
  // K[j0 + g][t]). The warp of rows 0-15 and columns 32-63 is all above the diagonal: zeros.
  {
    const int i0 = 16 * (warp & 3), jc = 32 * (warp >> 2);
    float qk[4][4] = {}, kk[4][4] = {};
    if (jc <= i0 + 15) {
      const float* qa = Qs + (i0 + g) * lq + t4;
      const float* ka = Ks + (i0 + g) * lq + t4;
      const float* kb = Ks + (jc + g) * lq + t4;
      for (int p = 0; p < dkp; p += 8) {
        const Tf32Pair qf[4] = {tf(qa[p]), tf(qa[8 * lq + p]), tf(qa[p + 4]),
                                tf(qa[8 * lq + p + 4])};
        const Tf32Pair kf[4] = {tf(ka[p]), tf(ka[8 * lq + p]), tf(ka[p + 4]),
                                tf(ka[8 * lq + p + 4])};
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
          const Tf32Pair bf[2] = {tf(kb[8 * nj * lq + p]), tf(kb[8 * nj * lq + p + 4])};
          mma_tf32x<kSplit>(qk[nj], qf, bf);
          mma_tf32x<kSplit>(kk[nj], kf, bf);
        }
      }
    }
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + g + 8 * (e / 2), jj = jc + 8 * nj + 2 * t4 + (e & 1);
        const float dec = jj <= i ? expf(float(gc[i] - gc[jj])) : 0.0f;
        PT[jj * kLX + i] = dec * qk[nj][e];
        X[i * kLX + jj] = jj < i ? betas[i] * dec * kk[nj][e] : 0.0f;
      }
  }
  // K' and e^gc Q (the first term of Q') to scratch, zero-padded rows of dkp.
  for (int e = int(threadIdx.x); e < n * dkp; e += kChunkThreads) {
    const int i = e / dkp, p = e % dkp;
    const int64_t at = ((tc + i) * Hv + h) * dkp + p;
    cs.kp[at] = ef[i] * Ks[i * lq + p];
    cs.qp[at] = eg[i] * Qs[i * lq + p];
  }
  if (threadIdx.x == 0) cs.elast[tc * Hv + h] = eg[n - 1];
  __syncthreads();
  // A column of Z a thread: its right-hand side into Z (which overlays Qs and Ks: the K columns,
  // dk <= kChunkThreads of them, staged through registers across a barrier), then its solution.
  const int cols = dk + dv, zl = L.zl;
  float* Z = smem + L.Z;  // [kChunk][zl]: the columns, then zeros (what the P Z products read past them)
  {
    const int col = int(threadIdx.x);
    float rhs[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) rhs[i] = col < dk ? betas[i] * eg[i] * Ks[i * lq + col] : 0.0f;
    __syncthreads();  // every thread has read Ks
    if (col < dk)
#pragma unroll
      for (int i = 0; i < kChunk; ++i) Z[i * zl + col] = rhs[i];
  }
  for (int col = dk + int(threadIdx.x); col < zl; col += kChunkThreads) {
    if (col >= cols) {
      for (int i = 0; i < kChunk; ++i) Z[i * zl + col] = 0.0f;
      continue;
    }
    const float* v = a.qkv + tc * a.ld + 2 * int64_t(a.Hk) * dk + int64_t(h) * dv + (col - dk);
    for (int i = 0; i < kChunk; ++i) Z[i * zl + col] = i < n ? betas[i] * v[i * a.ld] : 0.0f;
  }
  __syncthreads();
  for (int col = int(threadIdx.x); col < cols; col += kChunkThreads) {
    // Right-looking forward substitution over the first n rows: once rows m .. m + 3 are final,
    // every later row takes their terms.
    for (int m = 0; m < n; m += 4) {
      const float z0 = Z[m * zl + col];
      const float z1 = Z[(m + 1) * zl + col] - X[(m + 1) * kLX + m] * z0;
      const float z2 = Z[(m + 2) * zl + col] - X[(m + 2) * kLX + m] * z0 - X[(m + 2) * kLX + m + 1] * z1;
      const float z3 = Z[(m + 3) * zl + col] - X[(m + 3) * kLX + m] * z0 - X[(m + 3) * kLX + m + 1] * z1 -
                       X[(m + 3) * kLX + m + 2] * z2;
      Z[(m + 1) * zl + col] = z1;
      Z[(m + 2) * zl + col] = z2;
      Z[(m + 3) * zl + col] = z3;
      for (int i = m + 4; i < n; ++i) {
        const float4 x = *reinterpret_cast<const float4*>(X + i * kLX + m);
        Z[i * zl + col] -= x.x * z0 + x.y * z1 + x.z * z2 + x.w * z3;
      }
    }
    // Z's solved column to scratch (W or U).
    const bool is_w = col < dk;
    for (int i = 0; i < n; ++i) {
      if (is_w) cs.w[((tc + i) * Hv + h) * dkp + col] = Z[i * zl + col];
      else cs.u[((tc + i) * Hv + h) * dv4 + (col - dk)] = Z[i * zl + col];
    }
  }
  __syncthreads();  // every column of Z is solved
  // P Z on the tensor cores: Q' = e^gc Q - P W (e^gc Q written above) and O = P U. Warp w has rows
  // 16 (w % 4) .. + 15 and, 64 at a time, every second block of 64 columns from 64 (w / 4); A = P
  // (from PT: (g, t) is PT[t][g]), B = Z; only the columns m <= the warp's last row count.
  {
    const int i0 = 16 * (warp & 3);
    const int m_end = i0 + 16 < n ? i0 + 16 : n;
    for (int c0 = 64 * (warp >> 2); c0 < cols; c0 += 128) {
      float acc[8][4] = {};
      for (int m0 = 0; m0 < m_end; m0 += 8) {
        const float* pa = PT + (m0 + t4) * kLX + i0 + g;
        const Tf32Pair pf[4] = {tf(pa[0]), tf(pa[8]), tf(pa[4 * kLX]),
                                tf(pa[4 * kLX + 8])};
        const float* zb = Z + (m0 + t4) * zl + c0 + g;
#pragma unroll
        for (int nj = 0; nj < 8; ++nj) {
          const Tf32Pair bf[2] = {tf(zb[8 * nj]), tf(zb[4 * zl + 8 * nj])};
          mma_tf32x<kSplit>(acc[nj], pf, bf);
        }
      }
#pragma unroll
      for (int nj = 0; nj < 8; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + g + 8 * (e / 2), c = c0 + 8 * nj + 2 * t4 + (e & 1);
          if (i >= n || c >= cols) continue;
          if (c < dk) {
            float* q = cs.qp + ((tc + i) * Hv + h) * dkp + c;
            *q -= acc[nj][e];
          } else {
            cs.o[((tc + i) * Hv + h) * dv4 + (c - dk)] = acc[nj][e];
          }
        }
    }
  }
  // The padding columns of W, U and O (K' and Q' are padded above).
  for (int e = int(threadIdx.x); e < n * ((dkp - dk) + (dv4 - dv)); e += kChunkThreads) {
    const int per = (dkp - dk) + (dv4 - dv), i = e / per, q = e % per;
    const int64_t row = (tc + i) * Hv + h;
    if (q < dkp - dk) cs.w[row * dkp + dk + q] = 0.0f;
    else cs.u[row * dv4 + dv + (q - (dkp - dk))] = cs.o[row * dv4 + dv + (q - (dkp - dk))] = 0.0f;
  }
}

// Shared memory of the state kernel of W columns a block, in floats: Qp, Ws, Kp [kChunk][lq] (Q', W,
// K'), S [dkp][W + 8] (the state's columns of this block), Us [2][kChunk][W + 8] (U then V'; two: the
// next chunk's U loads while this chunk's V' is read) and Os [kChunk][W] (O). S and Us are B
// operands of mma (k t at column g: a row stride of 8 mod 32 banks puts a warp's 32 loads on 32
// banks).
struct ChunkSmem {
  int dkp, lq, sl;
  int64_t Qp, Ws, Kp, S, Us, Os, total;
  __host__ __device__ ChunkSmem(int dk, int width) {
    dkp = padded_dk(dk);
    lq = chunk_lq(dk);
    sl = width + 8;
    int64_t o = 0;
    Qp = o, o += int64_t(kChunk) * lq;
    Ws = o, o += int64_t(kChunk) * lq;
    Kp = o, o += int64_t(kChunk) * lq;
    S = o, o += int64_t(dkp) * sl;
    Us = o, o += 2 * int64_t(kChunk) * sl;
    Os = o, o += int64_t(kChunk) * width;
    total = o;
  }
  __host__ __device__ size_t bytes() const { return size_t(total) * sizeof(float); }
};


// Chunked form, part 2, the chunks of a sequence in order: block (sequence, value head, slice of
// kW columns); 8 warps for each 32 columns; the state slice in shared memory. The next chunk's Q',
// W, U, O load (cp.async) while this chunk's state update runs, its K' while its outputs are
// formed: groups A (Q', W, U, O) and B (K') in flight, at most one of each. A block takes one SM
// (its shared memory) and runs its sequence's chunks one after another: where the blocks of 32
// columns outnumber the SMs, blocks of 64 (and 16 warps) halve the waves for ~1.8 times a chunk's
// time (neither 16 warps nor 16 columns a warp change a chunk of 32 columns: not its products).
template <bool kSplit, int kW>
__global__ void __launch_bounds__(kChunkThreads * kW / 32, 1)
    delta_rule_chunked_kernel(const RuleArgs a, ChunkScratch cs) {
  wait_for_prior_kernels();
  const auto tf = [](float v) { return tf32_operand<kSplit>(v); };  // an operand of the products
  constexpr int kSL = kW + 8, kThreads = kChunkThreads * kW / 32, kWarps = kThreads / 32;
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int b = int(blockIdx.x), h = int(blockIdx.y);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t4 = lane % 4;
  const int wq = warp % kChunkWarps, cw = 32 * (warp / kChunkWarps);  // role, first of the warp's 32 columns
  const int j0 = int(blockIdx.z) * kW;  // this block's first column of dv
  const SeqView s = sequence_view(a.cu, a.state_slots, a.snaps, a.snap_width, b, a.T, a.slots);
  if (!s.ok || s.n <= 1 || s.snap) return;  // the recurrent kernel's sequences
  const int dk = a.dk, dv = a.dv, Hv = a.Hv, dv4 = ChunkScratch::round4(dv);
  const int64_t vd = int64_t(Hv) * dv;
  const ChunkSmem L(dk, kW);
  const int lq = L.lq, dkp = L.dkp;
  float* Qp = smem + L.Qp;
  float* Ws = smem + L.Ws;
  float* Kp = smem + L.Kp;
  float* S = smem + L.S;
  float* Us = smem + L.Us;
  float* Os = smem + L.Os;

  // A chunk's rows of [T, Hv, width] scratch into [kChunk][ld] shared memory (zeros past n), and its
  // slice of kW columns from j0 (zeros past w).
  const auto rows_async = [&](float* dst, int ld, const float* src, int64_t tc, int n, int width) {
    const int c4 = width / 4;
    for (int e = int(threadIdx.x); e < kChunk * c4; e += kThreads) {
      const int i = e / c4, q = e % c4;
      cp_async16(dst + i * ld + 4 * q, src + ((tc + (i < n ? i : 0)) * Hv + h) * width + 4 * q, i < n);
    }
  };
  const auto slice_async = [&](float* dst, int ld, const float* src, int64_t tc, int n) {
    for (int e = int(threadIdx.x); e < kChunk * (kW / 4); e += kThreads) {
      const int i = e / (kW / 4), q = e % (kW / 4), c = j0 + 4 * q;
      const bool ok = i < n && c < dv4;
      cp_async16(dst + i * ld + 4 * q, src + ((tc + (ok ? i : 0)) * Hv + h) * dv4 + (ok ? c : 0), ok);
    }
  };
  const auto chunk_rows = [&](int64_t c0) { return int(std::min<int64_t>(kChunk, s.n - c0)); };
  const auto u_of = [&](int64_t c0) { return Us + ((c0 / kChunk) & 1) * (kChunk * kSL); };
  const auto issue_outputs_part = [&](int64_t c0) {  // group A: what step 1 of chunk c0 reads
    const int64_t tc = s.t0 + c0;
    const int n = chunk_rows(c0);
    rows_async(Qp, lq, cs.qp, tc, n, dkp);
    rows_async(Ws, lq, cs.w, tc, n, dkp);
    slice_async(u_of(c0), kSL, cs.u, tc, n);
    slice_async(Os, kW, cs.o, tc, n);
    cp_async_commit();
  };
  const auto issue_state_part = [&](int64_t c0) {  // group B: what step 2 of chunk c0 reads
    rows_async(Kp, lq, cs.kp, s.t0 + c0, chunk_rows(c0), dkp);
    cp_async_commit();
  };

  {
    const float* state = a.states + (int64_t(s.slot) * Hv + h) * dk * dv;
    for (int p = warp; p < dkp; p += kWarps)
      for (int c = lane; c < kW; c += 32)
        S[p * kSL + c] = (p < dk && j0 + c < dv) ? state[int64_t(p) * dv + j0 + c] : 0.0f;
  }
  issue_outputs_part(0);
  issue_state_part(0);

  for (int64_t c0 = 0; c0 < s.n; c0 += kChunk) {
    const int n = chunk_rows(c0);
    const int64_t tc = s.t0 + c0;
    const bool more = c0 + kChunk < s.n;
    float* U = u_of(c0);
    cp_async_wait_all_but_last();  // group A of this chunk (its B may still be in flight)
    __syncthreads();               // ... for every thread's part (and the state written)

    // --- 1. out = O + Q' S0 (roles 0-3) and V' = U - W S0 (roles 4-7, into U): a warp's 16 rows
    // x 32 columns on the tensor cores, the state slice as the B operand ---
    {
      const float* A = (wq < 4 ? Qp : Ws) + (16 * (wq & 3) + g) * lq + t4;  // rows g, g + 8 at k t, t + 4
      float hi[4][4] = {}, lo[4][4] = {};
      for (int kk = 0; kk < dkp; kk += 8) {
        const Tf32Pair af[4] = {tf(A[kk]), tf(A[8 * lq + kk]), tf(A[kk + 4]),
                                tf(A[8 * lq + kk + 4])};
        const float* B = S + (kk + t4) * kSL + cw + g;
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
          const Tf32Pair bf[2] = {tf(B[8 * nj]), tf(B[4 * kSL + 8 * nj])};
          mma_tf32x_split<kSplit>(hi[nj], lo[nj], af, bf);
        }
      }
#pragma unroll
      for (int nj = 0; nj < 4; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 16 * (wq & 3) + g + 8 * (e / 2), c = cw + 8 * nj + 2 * t4 + (e & 1);
          const float v = hi[nj][e] + lo[nj][e];
          if (wq >= 4) U[i * kSL + c] -= v;
          else if (i < n && j0 + c < dv) a.out[(tc + i) * vd + int64_t(h) * dv + j0 + c] = Os[i * kW + c] + v;
        }
    }
    cp_async_wait_all();  // group B of this chunk (the latest)
    __syncthreads();  // V' written; Q', W, O read
    if (more) issue_outputs_part(c0 + kChunk);  // into the other U
    else cp_async_commit();  // an empty group keeps the count of groups in flight

    // --- 2. S = e^{gc_last} S0 + K'^T V': a warp's 16 rows of the state x 32 columns on the
    // tensor cores (A = K'^T read from K' rows, B = V'), over the chunk's rows in steps of 8 ---
    if (16 * wq < dkp) {
      const float elast = cs.elast[tc * Hv + h];
      const float* A = Kp + t4 * lq + 16 * wq + g;  // A(p, m) = K'[m][p]: (g, t) at Kp[t][g]
      float hi[4][4] = {}, lo[4][4] = {};
      for (int mm = 0; mm < n; mm += 8) {
        const float* am = A + mm * lq;
        const Tf32Pair af[4] = {tf(am[0]), tf(am[8]), tf(am[4 * lq]),
                                tf(am[4 * lq + 8])};
        const float* B = U + (mm + t4) * kSL + cw + g;
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
          const Tf32Pair bf[2] = {tf(B[8 * nj]), tf(B[4 * kSL + 8 * nj])};
          mma_tf32x_split<kSplit>(hi[nj], lo[nj], af, bf);
        }
      }
#pragma unroll
      for (int nj = 0; nj < 4; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float* sp = S + (16 * wq + g + 8 * (e / 2)) * kSL + cw + 8 * nj + 2 * t4 + (e & 1);
          *sp = elast * *sp + (hi[nj][e] + lo[nj][e]);
        }
    }
    __syncthreads();  // K' and V' read, S written
    if (more) issue_state_part(c0 + kChunk);
    else cp_async_commit();
  }
  float* state = a.states + (int64_t(s.slot) * Hv + h) * dk * dv;
  for (int p = warp; p < dk; p += kWarps)
    for (int c = lane; c < kW && j0 + c < dv; c += 32) state[int64_t(p) * dv + j0 + c] = S[p * kSL + c];
}

struct DeltaNetState {
  // dynamic shared memory the chunked kernels are set up for: [TF32, 3xTF32], and the state kernel's
  // [precision][32 or 64 columns]
  size_t solve_smem[2] = {}, chunked_smem[2][2] = {};
};

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
  a.out = f32_mut(out);
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
  if (kc <= 4) launch(conv1d_silu_kernel<4>, grid, kConvThreads, 0, stream_, a);
  else launch(conv1d_silu_kernel<16>, grid, kConvThreads, 0, stream_, a);
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
  a.qkv = f32(qkv);
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
  if (rpt <= 4) launch(delta_rule_recurrent_kernel<4>, grid, kRecWarps * 32, 0, stream_, a);
  else if (rpt <= 8) launch(delta_rule_recurrent_kernel<8>, grid, kRecWarps * 32, 0, stream_, a);
  else if (rpt <= 16) launch(delta_rule_recurrent_kernel<16>, grid, kRecWarps * 32, 0, stream_, a);
  else launch(delta_rule_recurrent_kernel<32>, grid, kRecWarps * 32, 0, stream_, a);
  check_launch("gated_delta_rule: recurrent");

  // The other sequences of more than one row: the chunked form, every chunk's solve at once, then
  // the chunks of each sequence in order.
  if (layout.max_query_len > 1) {
    const int64_t chunks_per_seq = cdiv(layout.max_query_len, kChunk);
    check(chunks_per_seq * B <= std::numeric_limits<int32_t>::max(), "gated_delta_rule: {} sequences of up to {} rows",
          B, layout.max_query_len);
    auto* scratch = static_cast<float*>(scratch_.bytes(ChunkScratch::floats(T, d.Hv, d.dk, d.dv) * sizeof(float)));
    const ChunkScratch cs = ChunkScratch::at(scratch, T, d.Hv, d.dk, d.dv);
    auto* st = static_cast<DeltaNetState*>(deltanet_state_.get());
    if (!st) {
      auto s = std::make_shared<DeltaNetState>();
      st = s.get();
      deltanet_state_ = std::move(s);
    }
    // The state kernel's blocks of 32 columns one to an SM, unless the prefills' outnumber the SMs.
    const int64_t prefills = layout.prefill_seqs >= 0 ? layout.prefill_seqs : B;
    const int width = prefills * d.Hv * cdiv(d.dv, 32) > cuda::rows::multiprocessors() ? 64 : 32, wi = width == 64;
    const dim3 state_grid{unsigned(B), unsigned(d.Hv), unsigned(cdiv(d.dv, width))};
    const size_t solve_smem = SolveSmem(d.dk, d.dv).bytes(), smem = ChunkSmem(d.dk, width).bytes();
    // Products in 3xTF32 (fp32 accuracy) unless bf16 products are asked for: then in TF32.
    const auto run = [&](auto solve_kernel, auto chunked_kernel, int pi) {
      if (solve_smem > st->solve_smem[pi]) {
        check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(solve_kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, int(solve_smem)),
                   "gated_delta_rule: shared memory of the solve kernel");
        st->solve_smem[pi] = solve_smem;
      }
      if (smem > st->chunked_smem[pi][wi]) {
        check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(chunked_kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                   "gated_delta_rule: shared memory of the chunked kernel");
        st->chunked_smem[pi][wi] = smem;
      }
      launch(solve_kernel, dim3{unsigned(chunks_per_seq * B), unsigned(d.Hv)}, kChunkThreads, solve_smem, stream_, a,
             cs, int(chunks_per_seq));
      check_launch("gated_delta_rule: chunk solve");
      launch(chunked_kernel, state_grid, kChunkThreads * width / 32, smem, stream_, a, cs);
    };
    if (bf16_matmul_) {
      if (wi) run(delta_rule_solve_kernel<false>, delta_rule_chunked_kernel<false, 64>, 0);
      else run(delta_rule_solve_kernel<false>, delta_rule_chunked_kernel<false, 32>, 0);
    } else {
      if (wi) run(delta_rule_solve_kernel<true>, delta_rule_chunked_kernel<true, 64>, 1);
      else run(delta_rule_solve_kernel<true>, delta_rule_chunked_kernel<true, 32>, 1);
    }
    check_launch("gated_delta_rule: chunked");
  }
}

}  // namespace ballast::kernels
