// CudaOps: the row, elementwise, norm, rope and gate ops (ops.h "rows and elementwise", the gated
// attention split and rope, the DeltaNet gates and gated norm). Each computes what the CPU
// reference (cpu/cpu_ops.cpp, cpu/gated_rms_norm.cpp) computes, in the same order of fp32
// operations where the order decides the rounding; reductions run in double (the CPU's
// rms_norm does too). Index data is never read on the host: kernels check each index and skip an
// out-of-range one (embedding and gather_rows write zeros for it, scatter_rows writes nothing).
//
// Launch shapes: elementwise ops are grid-stride loops (float4 where every pointer allows);
// row ops give a row to a block (wide rows) or to a warp (rows of at most 1024 elements), grid-
// stride over rows; all index math is 64-bit.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_rows_support.cuh"
#include "ballast/kernels/cuda/cuda_support.cuh"
#include "ballast/kernels/op_checks.h"
#include "ballast/kernels/random_fill.h"

namespace ballast::kernels {

using cuda::aligned16;
using cuda::blocks_for;
using cuda::cdiv;
using cuda::check_cuda;
using cuda::check_launch;
using cuda::expect_device;
using cuda::launch;
using cuda::load_after_wait;
using cuda::sigmoidf_;
using cuda::silu_;
using cuda::wait_for_prior_kernels;
using namespace cuda::rows;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Rows up to this long go to one warp each; longer ones to a block.
constexpr int64_t kWarpRowMax = 1024;

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

__device__ __forceinline__ float softplus_(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// The sum of v over a block of kThreads threads, the same value (same order) in every thread.
__device__ __forceinline__ double block_sum(double v, double* shared /* [kWarps] */) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  double s = 0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) s += shared[i];
  __syncthreads();  // `shared` may be written again by the next call
  return s;
}

bool overlap(const Tensor& a, const Tensor& b) {
  const char* pa = static_cast<const char*>(a.raw());
  const char* pb = static_cast<const char*>(b.raw());
  return a.nbytes() > 0 && b.nbytes() > 0 && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

// ============================================================================================
// Elementwise
// ============================================================================================

// out[i] = f(a[i], b[i]) for i < n; out may be a (each element is read, then written, by one
// thread). VEC: every pointer 16-byte aligned, the first n / 4 * 4 elements as float4.
template <typename F, bool VEC>
__global__ void binary_kernel(const float* a, const float* b, float* out, int64_t n, F f) {
  wait_for_prior_kernels();
  const int64_t stride = grid_threads();
  int64_t done = 0;
  if constexpr (VEC) {
    const int64_t n4 = n / 4;
    for (int64_t i = global_thread(); i < n4; i += stride) {
      const float4 va = reinterpret_cast<const float4*>(a)[i];
      const float4 vb = reinterpret_cast<const float4*>(b)[i];
      reinterpret_cast<float4*>(out)[i] = make_float4(f(va.x, vb.x), f(va.y, vb.y), f(va.z, vb.z), f(va.w, vb.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + global_thread(); i < n; i += stride) out[i] = f(a[i], b[i]);
}

struct AddF {
  __device__ float operator()(float y, float x) const { return y + x; }
};
struct SiluMulF {
  __device__ float operator()(float g, float u) const { return silu_(g) * u; }
};
struct MulSigmoidF {
  __device__ float operator()(float x, float g) const { return x * sigmoidf_(g); }
};

template <typename F>
void launch_binary(const float* a, const float* b, float* out, int64_t n, F f, cudaStream_t stream, const char* op) {
  if (n <= 0) return;
  const bool vec = aligned(a, 16) && aligned(b, 16) && aligned(out, 16);
  const unsigned blocks = blocks_for(vec ? std::max<int64_t>(n / 4, 1) : n, kThreads);
  if (vec) launch(binary_kernel<F, true>, blocks, kThreads, 0, stream, a, b, out, n, f);
  else launch(binary_kernel<F, false>, blocks, kThreads, 0, stream, a, b, out, n, f);
  check_launch(op);
}

// y[i] *= sigmoid(s[i / D]) for i < T * D.
template <typename T>
__global__ void fill_uniform_kernel(T* t, int64_t n, uint64_t seed, float scale) {
  wait_for_prior_kernels();
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float v = uniform_weight(seed, uint64_t(i), scale);
    if constexpr (std::is_same_v<T, float>) t[i] = v;
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) t[i] = __float2bfloat16_rn(v);
    else if constexpr (std::is_same_v<T, f8e4m3>) t[i].bits = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    else t[i] = __float2half_rn(v);
  }
}

// A block a row (grid-stride over the rows), float4s where V4 (D % 4 == 0, 16-byte aligned): the
// element-wise form divided each index by D in 64 bits, 3x the time of the bytes (docs/perf.md).
template <bool V4>
__global__ void scale_rows_sigmoid_kernel(float* y, const float* s, int64_t T, int64_t D) {
  wait_for_prior_kernels();
  using V = std::conditional_t<V4, float4, float>;
  const int64_t Dv = V4 ? D / 4 : D;
  for (int64_t r = blockIdx.x; r < T; r += gridDim.x) {
    const float g = sigmoidf_(load_after_wait(s + r));
    V* row = reinterpret_cast<V*>(y + r * D);
    for (int64_t c = threadIdx.x; c < Dv; c += blockDim.x) {
      V v = row[c];
      if constexpr (V4) v.x *= g, v.y *= g, v.z *= g, v.w *= g;
      else v *= g;
      row[c] = v;
    }
  }
}

// out[t, :A] = a[t], out[t, A:] = b[t].
__global__ void concat_cols_kernel(const float* a, const float* b, float* __restrict__ out,
                                   int64_t T, int64_t A, int64_t B) {
  wait_for_prior_kernels();
  const int64_t W = A + B, n = T * W;
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const int64_t t = i / W, c = i % W;
    out[i] = c < A ? a[t * A + c] : b[t * B + (c - A)];
  }
}

// beta = sigmoid(b); g = -exp(A_log[h]) * softplus(a + dt_bias[h]); [T, Hv]. Element-wise: the
// outputs may alias the inputs.
__global__ void delta_gates_kernel(const float* b, const float* a, const void* A_log, DType al_dt, const void* dt_bias,
                                   DType dt_dt, float* beta, float* g, int64_t n, int64_t Hv) {
  wait_for_prior_kernels();
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const int64_t h = i % Hv;
    const float bv = b[i], av = a[i];  // both read before either output is written
    beta[i] = sigmoidf_(bv);
    g[i] = -expf(load_weight(A_log, al_dt, h)) * softplus_(av + load_weight(dt_bias, dt_dt, h));
  }
}

// ============================================================================================
// Rows
// ============================================================================================

// out[t, :] = table[ids[t], :] as fp32; zeros for an id outside [0, V). A block per row.
__global__ void embedding_kernel(const int32_t* ids, const void* table, DType dt, int64_t V, int64_t H,
                                 float* __restrict__ out, int64_t T) {
  wait_for_prior_kernels();
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t id = ids[t];
    const bool ok = id >= 0 && id < V;
    float* o = out + t * H;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) o[h] = ok ? load_weight(table, dt, id * H + h) : 0.0f;
  }
}

// out[i, :] = x[rows[i] / row_div, :] in units U of a row; zeros where the row is out of range.
template <typename U>
__global__ void gather_rows_kernel(const U* x, const int32_t* rows, int row_div, int64_t M,
                                   U* __restrict__ out, int64_t N, int64_t units) {
  wait_for_prior_kernels();
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const int32_t r = rows[i];
    const int64_t src = r >= 0 && r / row_div < M ? r / row_div : -1;
    U* o = out + i * units;
    if (src >= 0) {
      const U* s = x + src * units;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) o[u] = s[u];
    } else {
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) o[u] = U{};
    }
  }
}

// out[rows[i], :] = x[i, :] in units U; a row outside [0, M) is skipped.
template <typename U>
__global__ void scatter_rows_kernel(const U* x, const int32_t* rows, int64_t M,
                                    U* __restrict__ out, int64_t N, int64_t units) {
  wait_for_prior_kernels();
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const int64_t r = rows[i];
    if (r < 0 || r >= M) continue;  // block-uniform
    const U* s = x + i * units;
    U* o = out + r * units;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) o[u] = s[u];
  }
}

// Row copies in the widest unit the row size and both pointers allow.
template <bool GATHER>
void launch_row_copy(const void* x, const int32_t* rows, int row_div, int64_t M, void* out, int64_t N, size_t row,
                     cudaStream_t stream) {
  auto go = [&](auto unit) {
    using U = decltype(unit);
    const int64_t units = int64_t(row / sizeof(U));
    const int threads = int(std::min<int64_t>(kThreads, cdiv(units, 32) * 32));
    const unsigned blocks = unsigned(std::min<int64_t>(N, 2147483647));
    if constexpr (GATHER)
      launch(gather_rows_kernel<U>, blocks, threads, 0, stream, static_cast<const U*>(x), rows, row_div, M,
             static_cast<U*>(out), N, units);
    else
      launch(scatter_rows_kernel<U>, blocks, threads, 0, stream, static_cast<const U*>(x), rows, M,
             static_cast<U*>(out), N, units);
  };
  auto fits = [&](size_t b) { return row % b == 0 && aligned(x, b) && aligned(out, b); };
  if (fits(16)) go(uint4{});
  else if (fits(8)) go(uint2{});
  else if (fits(4)) go(uint32_t{});
  else if (fits(2)) go(uint16_t{});
  else go(uint8_t{});
}

// Zero-centred RMSNorm (y = x rsqrt(mean x^2 + eps) (1 + w)), the same after x += z (added), or
// the gated one (y = w x rsqrt(mean x^2 + eps) silu(z)) over rows of D. BLOCK: a block per row;
// else a warp per row. x may be y: every element is read by the thread that writes it, after the
// row's sum is complete (added: x is written, by the thread that reads it again).
enum class Norm { zero_centred, added, gated };

// PER > 0: a thread's elements of the row (at most PER) are loaded once, all at once, and kept in
// registers between the sum and the output; PER = 0 walks the row twice (rows too long for that).
template <Norm MODE, bool BLOCK, int PER>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(const float* x, const float* z, const void* w, DType wdt, float eps, float* y, int64_t R, int64_t D) {
  wait_for_prior_kernels();
  __shared__ double partial[kWarps];
  const int64_t first = BLOCK ? blockIdx.x : int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t step = BLOCK ? gridDim.x : int64_t(gridDim.x) * kWarps;
  const int lane = BLOCK ? int(threadIdx.x) : int(threadIdx.x & 31);
  const int width = BLOCK ? kThreads : 32;
  constexpr int N = PER > 0 ? PER : 1;
  for (int64_t r = first; r < R; r += step) {  // BLOCK: block-uniform; else warp-uniform
    const float* xr = x + r * D;
    float* yr = y + r * D;
    float v[N], wq[N], zq[N];  // PER > 0: x, and the weights (and gates) loaded with it, before the sum
    double ss = 0;
    if constexpr (PER > 0) {
#pragma unroll
      for (int q = 0; q < PER; ++q) {
        const int64_t i = lane + int64_t(q) * width;
        v[q] = i < D ? xr[i] : 0.0f;
        if constexpr (MODE == Norm::added) v[q] += i < D ? z[r * D + i] : 0.0f;
        wq[q] = i < D ? load_weight(w, wdt, i) : 0.0f;
        zq[q] = MODE == Norm::gated && i < D ? z[r * D + i] : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < PER; ++q) {
        const int64_t i = lane + int64_t(q) * width;
        if constexpr (MODE == Norm::added)
          if (i < D) const_cast<float*>(xr)[i] = v[q];  // x is the residual stream, written in place
        ss += double(v[q]) * v[q];
      }
    } else {
      for (int64_t i = lane; i < D; i += width) {
        float u = xr[i];
        if constexpr (MODE == Norm::added) {
          u += z[r * D + i];
          const_cast<float*>(xr)[i] = u;
        }
        ss += double(u) * u;
      }
    }
    if constexpr (BLOCK) ss = block_sum(ss, partial);
    else ss = warp_sum(ss);
    float inv;
    if constexpr (MODE != Norm::gated) inv = 1.0f / sqrtf(float(ss / double(D)) + eps);  // as the CPU: the mean in double
    else inv = 1.0f / sqrtf(float(ss) / float(D) + eps);  // as cpu::gated_rms_norm: fp32 sum over fp32 D
    auto put = [&](float xv, float wv, float zv, int64_t i) {
      if constexpr (MODE != Norm::gated) yr[i] = xv * inv * (1.0f + wv);
      else yr[i] = wv * (xv * inv) * silu_(zv);
    };
    if constexpr (PER > 0) {
#pragma unroll
      for (int q = 0; q < PER; ++q) {
        const int64_t i = lane + int64_t(q) * width;
        if (i < D) put(v[q], wq[q], zq[q], i);
      }
    } else {
      for (int64_t i = lane; i < D; i += width)
        put(xr[i], load_weight(w, wdt, i), MODE == Norm::gated ? z[r * D + i] : 0.0f, i);
    }
  }
}

template <Norm MODE, bool BLOCK>
void launch_norm_rows(const float* x, const float* z, const Tensor& w, float eps, float* y, int64_t R, int64_t D,
                      cudaStream_t stream) {
  const int width = BLOCK ? kThreads : 32;
  const unsigned grid = BLOCK ? blocks_for(R, 1) : blocks_for(R, kWarps);
  auto go = [&](auto per) {
    launch(norm_kernel<MODE, BLOCK, decltype(per)::value>, grid, kThreads, 0, stream, x, z, w.raw(), w.dtype(), eps, y,
           R, D);
  };
  if (D <= 4 * width) go(std::integral_constant<int, 4>{});
  else if (D <= 8 * width) go(std::integral_constant<int, 8>{});
  else if (D <= 16 * width) go(std::integral_constant<int, 16>{});
  else if (D <= 32 * width) go(std::integral_constant<int, 32>{});
  else go(std::integral_constant<int, 0>{});
}

template <Norm MODE>
void launch_norm(const float* x, const float* z, const Tensor& w, float eps, float* y, int64_t R, int64_t D,
                 cudaStream_t stream, const char* op) {
  if (R <= 0 || D <= 0) return;
  if (D > kWarpRowMax) launch_norm_rows<MODE, true>(x, z, w, eps, y, R, D, stream);
  else launch_norm_rows<MODE, false>(x, z, w, eps, y, R, D, stream);
  check_launch(op);
}

constexpr int kQkMaxHd = 512;

// qk_norm_rope: a warp a head's row (row t's q heads, then its k heads), normed and rotated by
// rows::norm_rope_row through the warp's own row in shared memory. A q head's gate is copied beside
// it. k is read whole before it is written (in place).
template <int PER, int CAP>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_kernel(const float* qg, const void* qw, DType qwdt, const void* kw, DType kwdt, float eps,
                        const int32_t* pos, int64_t T, int64_t Hq, int64_t Hkv, int hd, int half, InvFreq<CAP> freq,
                        float* q, float* gate, float* k) {
  wait_for_prior_kernels();
  __shared__ float rows[kWarps][PER * 32];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  float* sh = rows[warp];
  const int64_t heads = Hq + Hkv, R = T * heads;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < R; r += int64_t(gridDim.x) * kWarps) {  // warp-uniform
    const int64_t t = r / heads, h = r % heads;
    const bool is_q = h < Hq;
    const float* src = is_q ? qg + (t * Hq + h) * 2 * hd : k + (t * Hkv + h - Hq) * hd;
    float* dst = is_q ? q + (t * Hq + h) * hd : k + (t * Hkv + h - Hq) * hd;
    norm_rope_row<PER>(src, is_q ? qw : kw, is_q ? qwdt : kwdt, eps, hd, half, freq, float(load_after_wait(pos + t)),
                       sh);
    if (is_q)
      for (int i = lane; i < hd; i += 32) gate[(t * Hq + h) * hd + i] = src[hd + i];
    for (int i = lane; i < hd; i += 32) dst[i] = sh[i];
    __syncwarp();  // every lane's reads of the shared row before the next row overwrites it
  }
}

}  // namespace

// ============================================================================================
// The ops
// ============================================================================================

void CudaOps::embedding(const Tensor& ids, const Tensor& table, Tensor& out) {
  auto timed = time_op("embedding");
  const auto [T, V, H] = check_embedding(ids, table, out);
  expect_device("embedding", "ids", ids);
  expect_device("embedding", "table", table);
  expect_device("embedding", "out", out);
  if (T == 0 || H == 0) return;
  const int threads = int(std::min<int64_t>(kThreads, cdiv(H, 32) * 32));
  launch(embedding_kernel, blocks_for(T, 1), threads, 0, stream_, cuda::i32(ids), table.raw(), table.dtype(), V, H,
         cuda::f32_mut(out), T);
  check_launch("embedding");
}

void CudaOps::rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) {
  auto timed = time_op("rms_norm");
  const auto [R, D] = check_rms_norm(x, w, y);
  expect_device("rms_norm", "x", x);
  expect_device("rms_norm", "y", y);
  expect_device("rms_norm", "w", w);
  launch_norm<Norm::zero_centred>(cuda::f32(x), nullptr, w, eps, cuda::f32_mut(y), R, D, stream_, "rms_norm");
}

void CudaOps::add_rms_norm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& y) {
  auto timed = time_op("add_rms_norm");
  const auto [R, D] = check_add_rms_norm(x, d, w, y);
  expect_device("add_rms_norm", "x", x);
  expect_device("add_rms_norm", "d", d);
  expect_device("add_rms_norm", "y", y);
  expect_device("add_rms_norm", "w", w);
  launch_norm<Norm::added>(cuda::f32(x), cuda::f32(d), w, eps, cuda::f32_mut(y), R, D, stream_, "add_rms_norm");
}

void CudaOps::add(Tensor& y, const Tensor& x) {
  auto timed = time_op("add");
  check_add(y, x);
  expect_device("add", "y", y);
  expect_device("add", "x", x);
  launch_binary(cuda::f32(y), cuda::f32(x), cuda::f32_mut(y), y.numel(), AddF{}, stream_, "add");
}

void CudaOps::copy(const Tensor& src, Tensor& dst) {
  auto timed = time_op("copy");
  check_copy(src, dst);
  if (src.nbytes() == 0 || src.raw() == dst.raw()) return;
  expect_device("copy", "src", src);
  expect_device("copy", "dst", dst);
  check(!overlap(src, dst), "copy: src {} and dst {} overlap", src, dst);
  check_cuda(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, stream_), "copy");
}

void CudaOps::zero(Tensor& t) {
  auto timed = time_op("zero");
  if (t.nbytes() == 0) return;
  expect_device("zero", "t", t);
  check_cuda(cudaMemsetAsync(t.raw(), 0, t.nbytes(), stream_), "zero");
}

void CudaOps::fill_uniform(Tensor& t, uint64_t seed, float scale) {
  auto timed = time_op("fill_uniform");
  check_fill_uniform(t, scale);
  if (t.numel() == 0) return;
  expect_device("fill_uniform", "t", t);
  const int64_t n = t.numel();
  const unsigned blocks = blocks_for(n, kThreads);
  if (t.dtype() == DType::F32)
    launch(fill_uniform_kernel<float>, blocks, kThreads, 0, stream_, static_cast<float*>(t.raw()), n, seed, scale);
  else if (t.dtype() == DType::BF16)
    launch(fill_uniform_kernel<__nv_bfloat16>, blocks, kThreads, 0, stream_, static_cast<__nv_bfloat16*>(t.raw()), n,
           seed, scale);
  else if (t.dtype() == DType::F8_E4M3)
    launch(fill_uniform_kernel<f8e4m3>, blocks, kThreads, 0, stream_, static_cast<f8e4m3*>(t.raw()), n, seed, scale);
  else launch(fill_uniform_kernel<__half>, blocks, kThreads, 0, stream_, static_cast<__half*>(t.raw()), n, seed, scale);
  check_launch("fill_uniform");
}

void CudaOps::concat_cols(const Tensor& a, const Tensor& b, Tensor& out) {
  auto timed = time_op("concat_cols");
  const auto [T, A, B] = check_concat_cols(a, b, out);
  expect_device("concat_cols", "a", a);
  expect_device("concat_cols", "b", b);
  expect_device("concat_cols", "out", out);
  if (T == 0 || A + B == 0) return;
  launch(concat_cols_kernel, blocks_for(T * (A + B), kThreads), kThreads, 0, stream_, cuda::f32(a), cuda::f32(b),
         cuda::f32_mut(out), T, A, B);
  check_launch("concat_cols");
}

void CudaOps::silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) {
  auto timed = time_op("silu_mul");
  check_silu_mul(gate, up, out);
  expect_device("silu_mul", "gate", gate);
  expect_device("silu_mul", "up", up);
  expect_device("silu_mul", "out", out);
  launch_binary(cuda::f32(gate), cuda::f32(up), cuda::f32_mut(out), out.numel(), SiluMulF{}, stream_, "silu_mul");
}

void CudaOps::mul_sigmoid(Tensor& x, const Tensor& gate) {
  auto timed = time_op("mul_sigmoid");
  check_mul_sigmoid(x, gate);
  expect_device("mul_sigmoid", "x", x);
  expect_device("mul_sigmoid", "gate", gate);
  launch_binary(cuda::f32(x), cuda::f32(gate), cuda::f32_mut(x), x.numel(), MulSigmoidF{}, stream_, "mul_sigmoid");
}

void CudaOps::scale_rows_sigmoid(Tensor& y, const Tensor& s) {
  auto timed = time_op("scale_rows_sigmoid");
  const auto [T, D] = check_scale_rows_sigmoid(y, s);
  expect_device("scale_rows_sigmoid", "s", s);
  expect_device("scale_rows_sigmoid", "y", y);
  if (T == 0 || D == 0) return;
  const unsigned grid = unsigned(std::min<int64_t>(T, 1 << 20));
  if (D % 4 == 0 && aligned16(y.raw()))
    launch(scale_rows_sigmoid_kernel<true>, grid, kThreads, 0, stream_, cuda::f32_mut(y), cuda::f32(s), T, D);
  else
    launch(scale_rows_sigmoid_kernel<false>, grid, kThreads, 0, stream_, cuda::f32_mut(y), cuda::f32(s), T, D);
  check_launch("scale_rows_sigmoid");
}

void CudaOps::gather_rows(const Tensor& x, const Tensor& rows, int row_div, Tensor& out) {
  auto timed = time_op("gather_rows");
  const auto [N, M, row] = check_gather_rows(x, rows, row_div, out);
  expect_device("gather_rows", "rows", rows);
  expect_device("gather_rows", "x", x);
  expect_device("gather_rows", "out", out);
  if (N == 0 || row == 0) return;
  // The CPU checks each row index on the host; here the kernel does (zeros for an invalid one).
  // In place, the rows read could be rows already written: out must not overlap x.
  check(!overlap(x, out), "gather_rows: out {} overlaps x {} (rows cannot be gathered in place)", out, x);
  launch_row_copy<true>(x.raw(), cuda::i32(rows), row_div, M, out.raw(), N, row, stream_);
  check_launch("gather_rows");
}

void CudaOps::scatter_rows(const Tensor& x, const Tensor& rows, Tensor& out) {
  auto timed = time_op("scatter_rows");
  const auto [N, M, row] = check_scatter_rows(x, rows, out);
  expect_device("scatter_rows", "rows", rows);
  expect_device("scatter_rows", "x", x);
  expect_device("scatter_rows", "out", out);
  if (N == 0 || row == 0) return;
  check(!overlap(x, out), "scatter_rows: x {} overlaps out {} (rows cannot be scattered in place)", x, out);
  launch_row_copy<false>(x.raw(), cuda::i32(rows), 1, M, out.raw(), N, row, stream_);
  check_launch("scatter_rows");
}

void CudaOps::qk_norm_rope(const Tensor& qg, const Tensor& q_norm, const Tensor& k_norm, float eps,
                           const Tensor& positions, int rot, double theta, Tensor& q, Tensor& gate, Tensor& k) {
  auto timed = time_op("qk_norm_rope");
  const auto [T, Hq, Hkv, hd] = check_qk_norm_rope(qg, q_norm, k_norm, positions, rot, q, gate, k);
  check(hd <= kQkMaxHd, "qk_norm_rope: heads of {} dims; this backend takes at most {}", hd, kQkMaxHd);
  expect_device("qk_norm_rope", "qg", qg);
  expect_device("qk_norm_rope", "q_norm", q_norm);
  expect_device("qk_norm_rope", "k_norm", k_norm);
  expect_device("qk_norm_rope", "positions", positions);
  expect_device("qk_norm_rope", "q", q);
  expect_device("qk_norm_rope", "gate", gate);
  expect_device("qk_norm_rope", "k", k);
  const int64_t R = T * (Hq + Hkv);
  if (R == 0 || hd == 0) return;
  const int half = rot / 2;
  const unsigned grid = unsigned(std::min<int64_t>(cdiv(R, kWarps), 1 << 20));
  auto go = [&](auto per, auto cap) {
    constexpr int PER = decltype(per)::value, CAP = decltype(cap)::value;
    const auto f = InvFreq<CAP>::of(theta, rot);
    launch(qk_norm_rope_kernel<PER, CAP>, grid, kThreads, 0, stream_, cuda::f32(qg), q_norm.raw(), q_norm.dtype(),
           k_norm.raw(), k_norm.dtype(), eps, cuda::i32(positions), T, Hq, Hkv, int(hd), half, f, cuda::f32_mut(q),
           cuda::f32_mut(gate), cuda::f32_mut(k));
  };
  auto with_cap = [&](auto per) {
    if (half <= 64) go(per, std::integral_constant<int, 64>{});
    else go(per, std::integral_constant<int, kQkMaxHd / 2>{});
  };
  if (hd <= 128) with_cap(std::integral_constant<int, 4>{});
  else if (hd <= 256) with_cap(std::integral_constant<int, 8>{});
  else with_cap(std::integral_constant<int, 16>{});
  check_launch("qk_norm_rope");
}

void CudaOps::delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias, Tensor& beta,
                          Tensor& g) {
  auto timed = time_op("delta_gates");
  const auto [T, Hv] = check_delta_gates(b, a, A_log, dt_bias, beta, g);
  expect_device("delta_gates", "b", b);
  expect_device("delta_gates", "a", a);
  expect_device("delta_gates", "beta", beta);
  expect_device("delta_gates", "g", g);
  expect_device("delta_gates", "A_log", A_log);
  expect_device("delta_gates", "dt_bias", dt_bias);
  if (T * Hv == 0) return;
  launch(delta_gates_kernel, blocks_for(T * Hv, kThreads), kThreads, 0, stream_, cuda::f32(b), cuda::f32(a),
         A_log.raw(), A_log.dtype(), dt_bias.raw(), dt_bias.dtype(), cuda::f32_mut(beta), cuda::f32_mut(g), T * Hv, Hv);
  check_launch("delta_gates");
}

void CudaOps::gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, float eps, Tensor& y) {
  auto timed = time_op("gated_rms_norm");
  const auto [rows, dv] = check_gated_rms_norm(x, z, w, y);
  expect_device("gated_rms_norm", "x", x);
  expect_device("gated_rms_norm", "z", z);
  expect_device("gated_rms_norm", "y", y);
  expect_device("gated_rms_norm", "w", w);
  launch_norm<Norm::gated>(cuda::f32(x), cuda::f32(z), w, eps, cuda::f32_mut(y), rows, dv, stream_, "gated_rms_norm");
}

}  // namespace ballast::kernels
