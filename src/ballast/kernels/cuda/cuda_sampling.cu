// CudaOps::sample and CudaOps::verify_drafts: drawing tokens on the device with the math of
// kernels/sampling.h, value for value as the CPU reference (cpu/cpu_sampling.cpp, sampling.cpp).
//
// One block of 1024 threads per logits row; the row streams through the block a few times:
// - greedy rows: one pass, the argmax (ties to the lower id), and the one-hot row if asked;
// - sampling rows: the max, the sum of exp((l - max) / T) in double, then, for top-k / top-p, a
//   radix select over the float bits of the probabilities (cuda_sampling_support.cuh: 3 levels of
//   1024 bins of count and fixed-point mass, usually ending after one or two when the bin at the
//   boundary holds a single token; a pass more when equal probabilities straddle it), and last
//   the draw: an in-order scan of the final probabilities in tiles, cumulated in double, that
//   stops at the first id whose cumulative probability exceeds u (and writes probs when asked).
// No probability row is stored: each pass recomputes p = float(double(e) / sum) from the logit
// (exp in double rounded to float, so that e is glibc's expf but for rare last-bit cases; the
// division through a reciprocal, exact: div_to_float). Sorting is never needed.
//
// verify_drafts runs the same per-row machinery on every target row at once (rows are
// independent): row i of sequence b decides whether d_{i+1} is accepted and, if not, the token
// that replaces it (the argmax for greedy rows, else the residual draw); row S draws the target's
// own token. A second kernel walks each sequence's rows left to right into out. Per-row results
// live in scratch (2 ints per row).
//
// Nothing here reads device data on the host, syncs or allocates but through scratch_: capturable.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "ballast/core/error.h"
#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_sampling_support.cuh"
#include "ballast/kernels/cuda/cuda_support.cuh"
#include "ballast/kernels/op_checks.h"
#include "ballast/kernels/sampling.h"

namespace ballast::kernels {

using namespace cuda;
using namespace cuda::sampling;

namespace {

constexpr int kThreads = 1024;  // one block per row
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // consecutive ids per thread in the in-order scans
constexpr unsigned kFull = 0xffffffffu;

struct RowArgs {
  const float* temperature;
  const float* top_p;
  const int32_t* top_k;
  const int64_t* seed;
  const int32_t* position;

  __device__ RowSampling params(int64_t r) const { return clamp_row(temperature[r], top_p[r], top_k[r]); }
  __device__ double uniform(int64_t r, Draw stream) const {
    return kernels::uniform(uint64_t(seed[r]), position[r], stream);
  }
};

// The processed distribution of a sampling row (kernels::distribution), held in shared memory.
struct Dist {
  float mx, temperature;
  double sum, inv_sum;
  bool truncated;
  Cut cut;
  double kept, inv_kept;

  // exp((l - mx) / T) in float: the exponential in double rounded once (glibc's expf is correctly
  // rounded but in rare cases; CUDA's expf is within 2 ulps).
  __device__ __forceinline__ float e(float logit) const { return float(exp(double((logit - mx) / temperature))); }
  // The softmax probability (the CPU's float(double(e) / sum)).
  __device__ __forceinline__ float raw(float logit) const {
    const float v = e(logit);
    return v > 0.0f ? div_to_float(v, sum, inv_sum) : v;
  }
  // The probability the token is drawn with.
  __device__ __forceinline__ float final_p(float logit, int id) const {
    const float p = raw(logit);
    if (!truncated || !(p > 0.0f)) return p;
    if (!cut.keeps(key_of(p), id)) return 0.0f;
    return div_to_float(p, kept, inv_kept);
  }
};

struct Smem {
  unsigned long long mass[kBins];
  int count[kBins];
  alignas(8) unsigned char red[kWarps * 8];  // one 8-byte value per warp for block reductions
  Boundary boundary;
  Dist dist;
};

__device__ __forceinline__ int lane_id() { return int(threadIdx.x) & 31; }
__device__ __forceinline__ int warp_id() { return int(threadIdx.x) >> 5; }

// --- block-wide reductions (every thread gets the same result, summed in the same order) ---

template <class T, class Op>
__device__ T block_reduce(T v, Op op, Smem& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  T* red = reinterpret_cast<T*>(sm.red);
  if (lane_id() == 0) red[warp_id()] = v;
  __syncthreads();
  T r = red[0];
#pragma unroll 4
  for (int w = 1; w < kWarps; ++w) r = op(r, red[w]);
  __syncthreads();
  return r;
}

struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <class T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <class T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct FmaxOp {  // ignores NaN
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// The sum of v over the threads before this one; `total` gets the block's sum.
__device__ double block_exclusive_sum(double v, double& total, Smem& sm) {
  double incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFull, incl, o);
    if (lane_id() >= o) incl += n;
  }
  double excl = __shfl_up_sync(kFull, incl, 1);
  if (lane_id() == 0) excl = 0.0;
  double* red = reinterpret_cast<double*>(sm.red);
  if (lane_id() == 31) red[warp_id()] = incl;
  __syncthreads();
  double before = 0.0, all = 0.0;
#pragma unroll 4
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp_id()) before = all;
    all += red[w];
  }
  __syncthreads();
  total = all;
  return before + excl;
}

// --- greedy: argmax, ties to the lowest id (as kernels::argmax, NaN never wins unless first) ---

// An order on floats as unsigned: NaN lowest (highest at id 0, where the CPU's scan keeps it),
// -0 as +0.
__device__ __forceinline__ uint32_t argmax_key(float v, bool first) {
  if (v != v) return first ? 0xffffffffu : 0u;
  const uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// A row of 16-byte alignment streams as float4s, kArgmaxLoads of them in flight a thread: one at a
// time, a 151,936-token row took ~32 us (one SM, ~19 GB/s; Nsight Compute, session 29).
constexpr int kArgmaxLoads = 4;

__device__ int row_argmax(const float* row, int V, Smem& sm) {
  unsigned long long best = 0;
  auto take = [&](float v, int i) {
    const unsigned long long k =
        (static_cast<unsigned long long>(argmax_key(v, i == 0)) << 32) | (0xffffffffu - uint32_t(i));
    best = k > best ? k : best;
  };
  int tail = 0;  // where the scalar loop starts
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int V4 = V / 4;
    for (int base = 0; base < V4; base += kThreads * kArgmaxLoads) {
      float4 v[kArgmaxLoads];
#pragma unroll
      for (int u = 0; u < kArgmaxLoads; ++u) {
        const int j = base + u * kThreads + int(threadIdx.x);
        if (j < V4) v[u] = row4[j];
      }
#pragma unroll
      for (int u = 0; u < kArgmaxLoads; ++u) {
        const int j = base + u * kThreads + int(threadIdx.x);
        if (j >= V4) continue;
        take(v[u].x, 4 * j);
        take(v[u].y, 4 * j + 1);
        take(v[u].z, 4 * j + 2);
        take(v[u].w, 4 * j + 3);
      }
    }
    tail = 4 * V4;
  }
  for (int i = tail + int(threadIdx.x); i < V; i += kThreads) take(row[i], i);
  best = block_reduce(best, MaxOp{}, sm);
  return int(0xffffffffu - uint32_t(best));
}

// --- the draw ---

// The first id, in id order, at which the sum of weight(id) over ids of positive weight (in
// double, as kernels::sample) exceeds u; if none does, the last id of positive weight; if there is
// none, 0. out, if not null, receives weight(id) for every id (the scan then goes to the end).
// Tiles of kThreads * kItems ids, kItems consecutive ones per thread.
template <class Weight>
__device__ int draw_in_order(int V, double u, Weight weight, float* __restrict__ out, Smem& sm) {
  int found = INT_MAX, last = -1;
  double carry = 0.0;
  for (int base = 0; base < V; base += kThreads * kItems) {
    const int first = base + int(threadIdx.x) * kItems;
    float w[kItems];
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int i = first + j;
      w[j] = i < V ? weight(i) : 0.0f;
      if (out && i < V) out[i] = w[j];
      if (w[j] > 0.0f) {
        s += double(w[j]);
        last = i;
      }
    }
    if (found == INT_MAX) {  // block-uniform
      double total;
      double c = carry + block_exclusive_sum(s, total, sm);
      int mine = INT_MAX;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        if (w[j] > 0.0f && mine == INT_MAX) {
          c += double(w[j]);
          if (u < c) mine = first + j;
        }
      }
      found = block_reduce(mine, MinOp{}, sm);
      carry += total;
      if (found != INT_MAX && !out) break;
    }
  }
  if (found != INT_MAX) return found;
  last = block_reduce(last, MaxOp{}, sm);
  return last >= 0 ? last : 0;
}

// --- the radix select of top-k / top-p ---

// One level: count and mass of the group's tokens by digit.
__device__ void histogram(const float* row, int V, int shift, uint32_t group, Smem& sm) {
  const Dist& d = sm.dist;
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    sm.count[b] = 0;
    sm.mass[b] = 0;
  }
  __syncthreads();
  for (int base = 0; base < V; base += kThreads) {
    const int i = base + int(threadIdx.x);
    float p = 0.0f;
    bool in = false;
    uint32_t digit = 0;
    if (i < V) {
      p = d.raw(row[i]);
      const uint32_t key = key_of(p);
      in = (key >> (shift + kDigitBits)) == group;
      digit = (key >> shift) & uint32_t(kBins - 1);
    }
#if __CUDA_ARCH__ >= 800
    const unsigned members = __ballot_sync(kFull, in);
    if (in) {
      // Tokens of a warp that fall in one bin add up first (the tail of a row crowds few bins).
      const unsigned peers = __match_any_sync(members, digit);
      const uint64_t m = fixed_mass(p);  // < 2^63: three parts whose sums over 32 lanes fit 32 bits
      const unsigned lo = __reduce_add_sync(peers, unsigned(m & 0x3FFFFFFu));
      const unsigned mid = __reduce_add_sync(peers, unsigned((m >> 26) & 0x3FFFFFFu));
      const unsigned hi = __reduce_add_sync(peers, unsigned(m >> 52));
      if (lane_id() == __ffs(peers) - 1) {
        atomicAdd(&sm.count[digit], __popc(peers));
        atomicAdd(&sm.mass[digit], static_cast<unsigned long long>(uint64_t(lo) + (uint64_t(mid) << 26) +
                                                                   (uint64_t(hi) << 52)));
      }
    }
#else
    if (in) {
      atomicAdd(&sm.count[digit], 1);
      atomicAdd(&sm.mass[digit], static_cast<unsigned long long>(fixed_mass(p)));
    }
#endif
  }
  __syncthreads();
}

// The level's boundary bin into sm.boundary (warp 0: each lane holds 32 bins in descending order).
__device__ void find_boundary(const LevelState& st, int n_k, uint64_t thr, Smem& sm) {
  if (warp_id() == 0) {
    const int lane = lane_id();
    const int top = kBins - 1 - lane * 32;  // the lane's bins: top, top - 1, ..., top - 31
    int c = 0;
    uint64_t m = 0;
#pragma unroll 4
    for (int j = 0; j < 32; ++j) {
      const int b = top - ((j + lane) & 31);  // rotated: no bank conflicts; integer sums
      c += sm.count[b];
      m += sm.mass[b];
    }
    int ci = c;
    uint64_t mi = m;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int cn = __shfl_up_sync(kFull, ci, o);
      const uint64_t mn = __shfl_up_sync(kFull, mi, o);
      if (lane >= o) {
        ci += cn;
        mi += mn;
      }
    }
    int c_excl = st.c_above + (ci - c);
    uint64_t m_excl = st.m_above + (mi - m);
    const bool here = !reached(c_excl, m_excl, n_k, thr) && reached(c_excl + c, m_excl + m, n_k, thr);
    const unsigned any = __ballot_sync(kFull, here);
    if (here) {
#pragma unroll 1
      for (int j = 0; j < 32; ++j) {
        const int b = top - j;
        const int cb = sm.count[b];
        const uint64_t mb = sm.mass[b];
        if (reached(c_excl + cb, m_excl + mb, n_k, thr)) {
          sm.boundary = Boundary{b, c_excl, m_excl, cb, mb, 0};
          break;
        }
        c_excl += cb;
        m_excl += mb;
      }
    }
    if (!any && lane == 31) sm.boundary = Boundary{-1, 0, 0, 0, 0, st.m_above + mi};
  }
  __syncthreads();
}

// sm.dist for sampling row `row` (as kernels::distribution).
__device__ void make_dist(const float* row, int V, const RowSampling& s, Smem& sm) {
  Dist& d = sm.dist;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < V; i += kThreads) mx = fmaxf(mx, row[i]);
  mx = block_reduce(mx, FmaxOp{}, sm);
  if (threadIdx.x == 0) {
    d.mx = mx;
    d.temperature = s.temperature;
  }
  __syncthreads();
  double sum = 0.0;
  for (int i = threadIdx.x; i < V; i += kThreads) sum += double(d.e(row[i]));
  sum = block_reduce(sum, SumOp{}, sm);
  const bool truncated = !untruncated(s);
  if (threadIdx.x == 0) {
    d.sum = sum;
    d.inv_sum = 1.0 / sum;
    d.truncated = truncated;
    d.kept = d.inv_kept = 1.0;
  }
  __syncthreads();
  if (!truncated) return;

  const int n_k = s.top_k > 0 && s.top_k < V ? s.top_k : V;
  const uint64_t thr = nucleus_threshold(s.top_p);
  LevelState st;
  Cut cut{0, 0, INT_MAX, 0};
  int tie_rank = 0;
  for (int shift = kKeyBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    histogram(row, V, shift, st.group, sm);
    find_boundary(st, n_k, thr, sm);
    // sm.boundary is written again only after the next histogram's barriers.
    if (decide(sm.boundary, shift, n_k, thr, st, cut, tie_rank)) break;
  }
  if (tie_rank > 0) {  // the id of the last tie kept: the tie_rank-th token of key cut.prefix
    const uint32_t key = cut.prefix;
    cut.tie_last = draw_in_order(
        V, double(tie_rank) - 0.5, [&](int i) { return key_of(d.raw(row[i])) == key ? 1.0f : 0.0f; }, nullptr, sm);
  }
  if (threadIdx.x == 0) {
    const uint64_t kept = cut.kept_fixed > 0 ? cut.kept_fixed : 1;  // > 0 unless the logits are NaN
    d.cut = cut;
    d.kept = __ull2double_rn(kept) * (1.0 / kFixedOne);
    d.inv_kept = 1.0 / d.kept;
  }
  __syncthreads();
}

// --- the kernels ---

// ids[r] (and probs[r, :] if probs) for row r = blockIdx.x.
__global__ void __launch_bounds__(kThreads) sample_kernel(const float* logits, int V, RowArgs rows,
                                                          Draw stream, int32_t* __restrict__ ids,
                                                          float* __restrict__ probs) {
  wait_for_prior_kernels();
  __shared__ Smem sm;
  const int64_t r = blockIdx.x;
  const float* row = logits + r * V;
  float* out = probs ? probs + r * V : nullptr;
  const RowSampling s = rows.params(r);
  if (s.greedy) {
    const int id = row_argmax(row, V, sm);
    if (threadIdx.x == 0) ids[r] = id;
    if (out)
      for (int i = threadIdx.x; i < V; i += kThreads) out[i] = i == id ? 1.0f : 0.0f;
    return;
  }
  make_dist(row, V, s, sm);
  const Dist& d = sm.dist;
  const int id = draw_in_order(
      V, rows.uniform(r, stream), [&](int i) { return d.final_p(row[i], i); }, out, sm);
  if (threadIdx.x == 0) ids[r] = id;
}

// Target row r = blockIdx.x = b * (S + 1) + i of verify_drafts: accepted[r] (row i < S accepts
// d_{i+1}) and token[r], the token that follows when row r is the first not accepted (greedy: the
// argmax; sampling, i < S: the residual draw; i == S: the target's draw).
__global__ void __launch_bounds__(kThreads) verify_rows_kernel(const float* logits, int V, int S,
                                                               const int32_t* drafts,
                                                               const float* draft_probs, RowArgs rows,
                                                               int32_t* __restrict__ token,
                                                               int32_t* __restrict__ accepted) {
  wait_for_prior_kernels();
  __shared__ Smem sm;
  const int64_t r = blockIdx.x;
  const int64_t b = r / (S + 1);
  const int i = int(r - b * (S + 1));
  const float* row = logits + r * V;
  const int32_t draft = i < S ? drafts[b * S + i] : -1;
  const RowSampling s = rows.params(r);
  if (s.greedy) {
    const int id = row_argmax(row, V, sm);
    if (threadIdx.x == 0) {
      token[r] = id;
      accepted[r] = i < S && draft == id;
    }
    return;
  }
  make_dist(row, V, s, sm);
  const Dist& d = sm.dist;
  if (i == S) {
    const int id = draw_in_order(
        V, rows.uniform(r, Draw::target), [&](int k) { return d.final_p(row[k], k); }, nullptr, sm);
    if (threadIdx.x == 0) {
      token[r] = id;
      accepted[r] = 0;
    }
    return;
  }
  // q: the draft's distribution (absent: every draft of a sampling row is rejected, the
  // correction drawn from p). A draft outside [0, V) has q = 0: rejected.
  const float* q = draft_probs ? draft_probs + (b * S + i) * V : nullptr;
  const bool valid = draft >= 0 && draft < V;
  const float qd = q && valid ? q[draft] : 0.0f;
  const float pd = valid ? d.final_p(row[draft], draft) : 0.0f;
  if (qd > 0.0f && rows.uniform(r, Draw::accept) < fmin(1.0, double(pd) / double(qd))) {
    if (threadIdx.x == 0) {
      token[r] = -1;
      accepted[r] = 1;
    }
    return;
  }
  // Rejected: the correction from normalise(max(0, p - q)), or from p when that is empty.
  const auto residual = [&](int k) { return fmaxf(0.0f, d.final_p(row[k], k) - (q ? q[k] : 0.0f)); };
  double part = 0.0;
  for (int k = threadIdx.x; k < V; k += kThreads) part += double(residual(k));
  const double sum = block_reduce(part, SumOp{}, sm);
  const double u = rows.uniform(r, Draw::residual);
  int id;
  if (sum > 0.0) {
    const double inv = 1.0 / sum;
    id = draw_in_order(
        V, u,
        [&](int k) {
          const float v = residual(k);
          return v > 0.0f ? div_to_float(v, sum, inv) : 0.0f;
        },
        nullptr, sm);
  } else {
    id = draw_in_order(V, u, [&](int k) { return d.final_p(row[k], k); }, nullptr, sm);
  }
  if (threadIdx.x == 0) {
    token[r] = id;
    accepted[r] = 0;
  }
}

// out[b] = [a, d_1 .. d_a, the token of row a, -1 ...] from the per-row results.
__global__ void verify_finish_kernel(int B, int S, const int32_t* drafts,
                                     const int32_t* token, const int32_t* accepted,
                                     int32_t* __restrict__ out) {
  wait_for_prior_kernels();
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int32_t* acc = accepted + b * (S + 1);
  int a = 0;
  while (a < S && acc[a]) ++a;
  int32_t* o = out + b * (S + 2);
  o[0] = a;
  for (int i = 0; i < a; ++i) o[1 + i] = drafts[b * S + i];
  o[1 + a] = token[b * (S + 1) + a];
  for (int i = a + 2; i < S + 2; ++i) o[i] = -1;
}

// Thread b: sequence b's first draft step inputs from its verdict [a, d_1 .. d_a, x, -1 ...].
// a is clamped to [0, S] (verify_drafts never writes another): the rows read stay in b's verdict.
__global__ void draft_inputs_kernel(int B, int S, const int32_t* verdicts, int32_t* __restrict__ tokens,
                                    int32_t* __restrict__ last_rows, int32_t* __restrict__ routed) {
  wait_for_prior_kernels();
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int32_t* v = verdicts + b * (S + 2);
  const int a = min(max(v[0], 0), S);
  for (int t = 0; t <= S; ++t) tokens[b * (S + 1) + t] = v[1 + min(t, a)];
  if (routed != nullptr)
    for (int t = 0; t <= S; ++t) routed[b * (S + 1) + t] = t <= a;
  last_rows[b] = int32_t(b * (S + 1) + a);
}

// The per-row sampling parameters (shapes and dtypes checked by the contract's checks; values are
// clamped on the device), in CUDA memory.
RowArgs row_args(const char* op, const SamplingRows& rows) {
  expect_device(op, "temperature", rows.temperature);
  expect_device(op, "top_p", rows.top_p);
  expect_device(op, "top_k", rows.top_k);
  expect_device(op, "seed", rows.seed);
  expect_device(op, "position", rows.position);
  return RowArgs{f32(rows.temperature), f32(rows.top_p), i32(rows.top_k),
                 static_cast<const int64_t*>(rows.seed.raw()), i32(rows.position)};
}

}  // namespace

void CudaOps::sample(const Tensor& logits, const SamplingRows& rows, Draw stream, Tensor& ids, Tensor& probs) {
  auto timed = time_op("sample");
  const auto [R, V] = check_sample(logits, rows, ids, probs);
  check(R <= INT32_MAX && V <= kMaxTokens, "sample: logits {} is too large", logits);
  expect_device("sample", "logits", logits);
  expect_device("sample", "ids", ids);
  if (probs.defined()) expect_device("sample", "probs", probs);
  const RowArgs args = row_args("sample", rows);
  if (R == 0) return;
  launch(sample_kernel, unsigned(R), kThreads, 0, stream_, f32(logits), int(V), args, stream, i32_mut(ids),
         probs.defined() ? f32_mut(probs) : nullptr);
  check_launch("sample");
}

void CudaOps::verify_drafts(const Tensor& logits, const Tensor& drafts, const Tensor& draft_probs,
                            const SamplingRows& rows, Tensor& out) {
  auto timed = time_op("verify_drafts");
  const auto [B, S, V] = check_verify_drafts(logits, drafts, draft_probs, rows, out);
  const int64_t R = B * (S + 1);
  check(R <= INT32_MAX && V <= kMaxTokens, "verify_drafts: logits {} is too large", logits);
  expect_device("verify_drafts", "drafts", drafts);
  expect_device("verify_drafts", "logits", logits);
  expect_device("verify_drafts", "out", out);
  // Whether a row samples is device data: draft_probs is checked when given, and when absent a
  // sampling row rejects its draft (q = 0) and draws the correction from p.
  if (draft_probs.defined()) expect_device("verify_drafts", "draft_probs", draft_probs);
  const RowArgs args = row_args("verify_drafts", rows);
  if (B == 0) return;
  int32_t* token = static_cast<int32_t*>(scratch_->bytes(size_t(2 * R) * sizeof(int32_t)));
  int32_t* accepted = token + R;
  launch(verify_rows_kernel, unsigned(R), kThreads, 0, stream_, f32(logits), int(V), int(S),
         S > 0 ? i32(drafts) : nullptr, draft_probs.defined() ? f32(draft_probs) : nullptr, args, token, accepted);
  check_launch("verify_drafts: rows");
  launch(verify_finish_kernel, blocks_for(B, 128), 128, 0, stream_, int(B), int(S), S > 0 ? i32(drafts) : nullptr,
         token, accepted, i32_mut(out));
  check_launch("verify_drafts");
}

void CudaOps::draft_inputs(const Tensor& verdicts, Tensor& tokens, Tensor& last_rows, Tensor& routed) {
  auto timed = time_op("draft_inputs");
  const auto [B, S] = check_draft_inputs(verdicts, tokens, last_rows, routed);
  check(B * (S + 2) <= INT32_MAX, "draft_inputs: verdicts {} is too large", verdicts);
  expect_device("draft_inputs", "verdicts", verdicts);
  expect_device("draft_inputs", "tokens", tokens);
  expect_device("draft_inputs", "last_rows", last_rows);
  if (routed.defined()) expect_device("draft_inputs", "routed", routed);
  if (B == 0) return;
  launch(draft_inputs_kernel, blocks_for(B, 128), 128, 0, stream_, int(B), int(S), i32(verdicts), i32_mut(tokens),
         i32_mut(last_rows), routed.defined() ? i32_mut(routed) : nullptr);
  check_launch("draft_inputs");
}

}  // namespace ballast::kernels
