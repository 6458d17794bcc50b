// CudaOps::token_logprobs: the log-softmax of raw logits rows (as cpu/cpu_logprobs.cpp): one
// block per row; the row's max, then the sum of exp(l - max) in double (block reductions), the
// token's logprob, and the K best tokens by K block-wide arg-max passes, each over the tokens
// ranked below the last pick ((logit, id) order: larger logit first, ties to the lower id), so
// nothing is sorted or stored. K <= kMaxTopLogprobs passes over a row that stays in L2.
//
// An id >= V is data the host cannot see: its logprob is written as NaN (the CPU backend throws).
// Nothing here syncs or allocates: capturable.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ballast/core/error.h"
#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_support.cuh"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

using namespace cuda;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// (logit, id) ranked: a before b when a's logit is larger, or equal with a lower id.
struct Ranked {
  float v;
  int id;
};
__device__ __forceinline__ bool before(Ranked a, Ranked b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }

__device__ __forceinline__ Ranked shfl_xor(Ranked a, int o) {
  return {__shfl_xor_sync(kFull, a.v, o), __shfl_xor_sync(kFull, a.id, o)};
}

struct Smem {
  double sum[kWarps];
  float mx[kWarps];
  Ranked best[kWarps];
};

// Every thread gets the block's result; the shared slots are free again on return.
__device__ float block_max(float v, Smem& sm) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  if ((threadIdx.x & 31) == 0) sm.mx[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = sm.mx[0];
  for (int w = 1; w < kWarps; ++w) r = fmaxf(r, sm.mx[w]);
  __syncthreads();
  return r;
}

__device__ double block_sum(double v, Smem& sm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if ((threadIdx.x & 31) == 0) sm.sum[threadIdx.x >> 5] = v;
  __syncthreads();
  double r = sm.sum[0];
  for (int w = 1; w < kWarps; ++w) r += sm.sum[w];
  __syncthreads();
  return r;
}

__device__ Ranked block_best(Ranked v, Smem& sm) {
  for (int o = 16; o > 0; o >>= 1) {
    const Ranked other = shfl_xor(v, o);
    if (before(other, v)) v = other;
  }
  if ((threadIdx.x & 31) == 0) sm.best[threadIdx.x >> 5] = v;
  __syncthreads();
  Ranked r = sm.best[0];
  for (int w = 1; w < kWarps; ++w)
    if (before(sm.best[w], r)) r = sm.best[w];
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(kThreads) token_logprobs_kernel(const float* logits, int V,
                                                                  const int32_t* ids,
                                                                  float* __restrict__ logprob, int K,
                                                                  int32_t* __restrict__ top_ids,
                                                                  float* __restrict__ top_logprobs) {
  wait_for_prior_kernels();
  __shared__ Smem sm;
  const int64_t r = blockIdx.x;
  const float* row = logits + r * V;
  float mx = -INFINITY;
  for (int v = int(threadIdx.x); v < V; v += kThreads) mx = fmaxf(mx, row[v]);
  mx = block_max(mx, sm);
  double sum = 0;
  for (int v = int(threadIdx.x); v < V; v += kThreads) sum += exp(double(row[v]) - double(mx));
  const double norm = double(mx) + log(block_sum(sum, sm));
  if (threadIdx.x == 0) {
    const int id = ids[r];
    logprob[r] = id < 0 ? 0.0f : id < V ? float(double(row[id]) - norm) : NAN;
  }
  Ranked last{INFINITY, -1};
  for (int k = 0; k < K; ++k) {
    Ranked best{-INFINITY, V};
    for (int v = int(threadIdx.x); v < V; v += kThreads) {
      const Ranked c{row[v], v};
      if (before(last, c) && before(c, best)) best = c;
    }
    last = block_best(best, sm);
    if (threadIdx.x == 0) {
      top_ids[r * K + k] = last.id;
      top_logprobs[r * K + k] = float(double(last.v) - norm);
    }
  }
}

}  // namespace

void CudaOps::token_logprobs(const Tensor& logits, const Tensor& ids, Tensor& logprob, Tensor& top_ids,
                             Tensor& top_logprobs) {
  auto timed = time_op("token_logprobs");
  const auto [R, V, K] = check_token_logprobs(logits, ids, logprob, top_ids, top_logprobs);
  check(R <= INT32_MAX && V <= INT32_MAX, "token_logprobs: logits {} is too large", logits);
  expect_device("token_logprobs", "logits", logits);
  expect_device("token_logprobs", "ids", ids);
  expect_device("token_logprobs", "logprob", logprob);
  if (K > 0) {
    expect_device("token_logprobs", "top_ids", top_ids);
    expect_device("token_logprobs", "top_logprobs", top_logprobs);
  }
  if (R == 0) return;
  launch(token_logprobs_kernel, unsigned(R), kThreads, 0, stream_, f32(logits), int(V), i32(ids), f32_mut(logprob),
         int(K), K > 0 ? i32_mut(top_ids) : nullptr, K > 0 ? f32_mut(top_logprobs) : nullptr);
  check_launch("token_logprobs");
}

}  // namespace ballast::kernels
