#pragma once
// Helpers shared by the CUDA ops (internal to ballast_kernels_cuda): error checks that throw
// ballast::Error naming the call, launch shapes, and loads of any weight dtype as float. An op's
// arguments are checked by the contract's checks (kernels/op_checks.h), then by expect_device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ballast/core/error.h"
#include "ballast/core/tensor.h"

namespace ballast::kernels::cuda {

// Throws ballast::Error("<what>: <CUDA's message>") unless err is cudaSuccess.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail("{}: {} ({})", what, cudaGetErrorString(err), int(err));
}
// After a launch: the launch's own error (bad shape, no kernel image for this device).
inline void check_launch(const char* op) { check_cuda(cudaGetLastError(), op); }

constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of at most 2^31-1 blocks (grid-stride loops cover the rest).
inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = cdiv(n, threads);
  return unsigned(b < 1 ? 1 : (b > 2147483647 ? 2147483647 : b));
}

// Element i of a weight of dtype dt as float (F32, BF16, F16).
__device__ __forceinline__ float load_as_float(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::F8_E4M3:
      return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<const __nv_fp8_storage_t*>(p)[i], __NV_E4M3)));
    default: return static_cast<const float*>(p)[i];
  }
}

// Accurate (not __expf) exponentials throughout: results are held to the CPU reference.
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

inline const int32_t* i32(const Tensor& t) { return static_cast<const int32_t*>(t.raw()); }
inline int32_t* i32_mut(const Tensor& t) { return static_cast<int32_t*>(t.raw()); }
inline const float* f32(const Tensor& t) { return static_cast<const float*>(t.raw()); }
inline float* f32_mut(const Tensor& t) { return static_cast<float*>(t.raw()); }

// Checks that `t` is defined and in CUDA memory (what a kernel can read; its shape and dtype are
// the contract's checks).
inline void expect_device(const char* op, const char* name, const Tensor& t) {
  check(t.defined(), "{}: {} is not defined", op, name);
  check(t.device() == Device::CUDA, "{}: {} {} is not in CUDA memory", op, name, t);
}

}  // namespace ballast::kernels::cuda
