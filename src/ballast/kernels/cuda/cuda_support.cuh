#pragma once
// Helpers shared by the CUDA ops (internal to ballast_kernels_cuda): error checks that throw
// ballast::Error naming the call, launch shapes, and loads of any weight dtype as float. An op's
// arguments are checked by the contract's checks (kernels/op_checks.h), then by expect_device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/core/tensor.h"

namespace ballast::kernels::cuda {

// Throws ballast::Error("<what>: <CUDA's message>") unless err is cudaSuccess.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail("{}: {} ({})", what, cudaGetErrorString(err), int(err));
}
// After a launch: the launch's own error (bad shape, no kernel image for this device).
inline void check_launch(const char* op) { check_cuda(cudaGetLastError(), op); }

// cudaMalloc of `bytes` on the current device; where it fails, an error naming what was being
// allocated, how much, and how much of the device was free then (an out-of-memory on a shared GPU
// says whose allocation ran out, not only that one did).
inline void* device_malloc(size_t bytes, const std::string& what) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaSuccess) return p;
  cudaGetLastError();  // (clears the error: the device is still usable)
  size_t free = 0, total = 0;
  int device = -1;
  cudaGetDevice(&device);
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) free = total = 0;
  fail("{}: cannot allocate {:.2f} GB on cuda:{}: {} ({:.2f} GB of {:.2f} GB free)", what, double(bytes) / 1e9, device,
       cudaGetErrorString(err), double(free) / 1e9, double(total) / 1e9);
}

constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether float4 / 16-byte accesses may start at p.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

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

// Programmatic dependent launch (Hopper): every kernel is launched with `launch`, which lets it
// start while the kernel before it on the stream is still running, and every kernel begins with
// `wait_for_prior_kernels()`, which holds it until that kernel has finished and its writes are
// visible, then lets the next one start. What this overlaps is a launch's latency and a grid's
// ramp with the tail of the one before: decode steps are chains of small dependent kernels
// (docs/perf.md). Both are no-ops where there is nothing to overlap (no kernel before, or a
// device older than sm_90).
__device__ __forceinline__ void wait_for_prior_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Loads of what the kernels before wrote (activations), after wait_for_prior_kernels(): __ldg
// (ld.global.nc) tells the compiler that the memory never changes while the kernel runs, which
// lets it move the load above the wait and read stale data (seen on the H200: docs/perf.md);
// these stay below it (volatile asm keeps its order with the wait's). __ldg is for weights only,
// and so is `const T* __restrict__` on a kernel's parameters: the compiler makes ld.global.nc of
// such loads itself (and of others it proves unaliased, e.g. int loads in a kernel that stores
// only floats: read those with these helpers).
__device__ __forceinline__ float4 load4_after_wait(const float* p) {
  float4 v;
  asm volatile("ld.global.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 load_u4_after_wait(const void* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 load_u2_after_wait(const void* p) {
  uint2 v;
  asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ float load_after_wait(const float* p) {
  float v;
  asm volatile("ld.global.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ float load_after_wait(const __nv_bfloat16* p) {
  unsigned short v;
  asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return __uint_as_float(uint32_t(v) << 16);
}
__device__ __forceinline__ int32_t load_after_wait(const int32_t* p) {
  int32_t v;
  asm volatile("ld.global.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// Whether a path that A/B runs switch off is on: yes unless the environment sets `name` to 0 (the
// caller reads it once, into a static, like CUDA's own CUDA_LAUNCH_BLOCKING).
inline bool switched_on(const char* name) {
  const char* v = std::getenv(name);
  return !(v && v[0] == '0' && v[1] == 0);
}

// Whether launches may overlap: yes unless BALLAST_CUDA_PDL=0, a switch for measuring what the
// overlap gives and for ruling it out when a result looks wrong.
inline bool overlap_launches() {
  static const bool on = switched_on("BALLAST_CUDA_PDL");
  return on;
}

// Whether side work (Ops::side) runs on a stream of its own: yes unless BALLAST_CUDA_SIDE_STREAM=0.
inline bool side_stream_enabled() {
  static const bool on = switched_on("BALLAST_CUDA_SIDE_STREAM");
  return on;
}

// Whether `kernel` is left out of its launches: its (mangled) name contains one of the
// comma-separated strings of BALLAST_CUDA_SKIP_KERNELS (read once). A profiling aid: a step's graph
// captured without a kernel times what that kernel costs inside it, overlaps and all (docs/perf.md,
// "leave a kernel out"); the outputs are then wrong, and the first kernel left out says so.
inline bool skipped_kernel(const void* kernel) {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    const char* env = std::getenv("BALLAST_CUDA_SKIP_KERNELS");
    for (const char* p = env; p && *p;) {
      const char* e = std::strchr(p, ',');
      const size_t n = e ? size_t(e - p) : std::strlen(p);
      if (n > 0) v.emplace_back(p, n);
      p += n + (e ? 1 : 0);
    }
    return v;
  }();
  if (names.empty()) return false;
  const char* name = nullptr;
  if (cudaFuncGetName(&name, kernel) != cudaSuccess || name == nullptr) return false;
  for (const std::string& n : names)
    if (std::strstr(name, n.c_str()) != nullptr) {
      static const bool said = (std::fprintf(stderr, "[ballast] BALLAST_CUDA_SKIP_KERNELS: kernels left out (%s first): "
                                                     "outputs are wrong, times are what is read\n", name), true);
      (void)said;
      return true;
    }
  return false;
}

// kernel<<<grid, block, smem, stream>>>(args...), allowed to overlap the kernel before it on the
// stream (see wait_for_prior_kernels). The launch's error is left for check_launch.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  if (skipped_kernel(reinterpret_cast<const void*>(kernel))) return;
  cudaLaunchAttribute overlap[1];
  overlap[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = overlap;
  config.numAttrs = overlap_launches() ? 1 : 0;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Accurate (not __expf) exponentials throughout: results are held to the CPU reference.
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu_(float x) { return x / (1.0f + expf(-x)); }  // as cpu::silu

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
