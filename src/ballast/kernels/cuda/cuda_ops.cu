// CudaOps: construction and the ops' shared scratch. The ops themselves are in cuda_*.cu by group.
#include "ballast/kernels/cuda/cuda_ops.h"

#include <algorithm>

#include "ballast/kernels/cuda/cuda_support.cuh"
#include "ballast/kernels/op_timing.h"

namespace ballast::kernels {

using cuda::check_cuda;

CudaScratch::~CudaScratch() {
  if (data_) {
    cudaStreamSynchronize(stream_);
    cudaFree(data_);
  }
}

void* CudaScratch::bytes(size_t n) {
  if (n > size_) {
    // Queued kernels may still read the old buffer: let them finish before it goes.
    check_cuda(cudaStreamSynchronize(stream_), "scratch: stream");
    if (data_) check_cuda(cudaFree(data_), "scratch: cudaFree");
    data_ = nullptr;
    const size_t rounded = (n + 255) / 256 * 256;
    data_ = cuda::device_malloc(rounded, "the ops' scratch");
    size_ = rounded;
    ++counters_.memory_epoch;  // graphs captured before read the old buffer
    ++counters_.allocations;
    counters_.bytes_allocated += int64_t(rounded);
  }
  return data_;
}

void CudaSmemAllowance::allow_kernel(const void* kernel, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  size_t& allowed = allowed_[kernel];
  if (bytes <= allowed) return;
  check(bytes <= optin_, "{}: needs {} bytes of shared memory a block, the device allows {}", op, bytes,
        optin_);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), op);
  allowed = bytes;
}

CudaSideStream::CudaSideStream() {
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "side stream");
  check_cuda(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "side stream: event");
  check_cuda(cudaEventCreateWithFlags(&joined, cudaEventDisableTiming), "side stream: event");
}

CudaSideStream::~CudaSideStream() {
  cudaStreamSynchronize(stream);
  cudaEventDestroy(fork);
  cudaEventDestroy(joined);
  cudaStreamDestroy(stream);
}

CudaOps::CudaOps(Counters& counters, const CudaDeviceTraits& device, cudaStream_t stream, cublasHandle_t cublas,
                 void* cublas_workspace, size_t cublas_workspace_bytes, bool bf16_matmul)
    : counters_(counters),
      device_(device),
      stream_(stream),
      main_stream_(stream),
      cublas_(cublas),
      cublas_stream_(stream),
      cublas_workspace_(cublas_workspace),
      cublas_workspace_bytes_(cublas_workspace_bytes),
      bf16_matmul_(bf16_matmul),
      main_scratch_(counters, stream),
      side_scratch_(counters, side_.stream),
      timer_(stream),
      smem_(device.smem_optin) {}

void CudaOps::side(const std::function<void()>& work) {
  if (stream_ != main_stream_ || timer_.on() || !cuda::side_stream_enabled()) {
    work();
    return;
  }
  check_cuda(cudaEventRecord(side_.fork, main_stream_), "side work: fork");
  check_cuda(cudaStreamWaitEvent(side_.stream, side_.fork, 0), "side work: fork");
  side_out_ = true;
  stream_ = side_.stream;
  scratch_ = &side_scratch_;
  struct Back {  // to the main stream, also when `work` throws
    CudaOps& ops;
    ~Back() {
      cudaEventRecord(ops.side_.joined, ops.side_.stream);
      ops.stream_ = ops.main_stream_;
      ops.scratch_ = &ops.main_scratch_;
      // The cuBLAS handle too (the backend's own calls, the ceilings', expect it there); where this
      // fails the handle's stream stays recorded as the side's, and the next library call moves it
      // (or says why it cannot).
      if (ops.cublas_stream_ != ops.main_stream_ && ops.move_cublas(ops.main_stream_))
        ops.cublas_stream_ = ops.main_stream_;
    }
  } back{*this};
  work();
}

void CudaOps::join_side() {
  if (!side_out_ || stream_ != main_stream_) return;
  check_cuda(cudaStreamWaitEvent(main_stream_, side_.joined, 0), "side work: join");
  side_out_ = false;
}

// prefetch: the weights' bytes in pieces, each asked of L2 by one thread's bulk prefetch (Hopper's
// copy engine does the reads: no registers, no shared memory, nothing to wait for; the block may
// end before the bytes land). Pieces are numbered across the spans and dealt over the grid.
namespace {

constexpr int kPrefetchSpans = 16;
constexpr uint64_t kPrefetchPiece = 8 * 1024;
constexpr int kPrefetchThreads = 32;

struct PrefetchSpans {
  const char* base[kPrefetchSpans];
  uint64_t bytes[kPrefetchSpans];  // multiples of 16, as the bases are
  int n = 0;
};

__global__ void __launch_bounds__(kPrefetchThreads) prefetch_l2_kernel(PrefetchSpans s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Reads only weights, which no op writes: nothing to wait for; the next kernel may start at once.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const uint64_t stride = uint64_t(gridDim.x) * kPrefetchThreads;
  uint64_t piece = uint64_t(blockIdx.x) * kPrefetchThreads + threadIdx.x, first = 0;
  for (int i = 0; i < s.n; ++i) {
    const uint64_t pieces = (s.bytes[i] + kPrefetchPiece - 1) / kPrefetchPiece;
    for (; piece < first + pieces; piece += stride) {
      const uint64_t off = (piece - first) * kPrefetchPiece;
      const uint32_t size = uint32_t(min(kPrefetchPiece, s.bytes[i] - off));
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(s.base[i] + off), "r"(size) : "memory");
    }
    first += pieces;
  }
#endif
}

}  // namespace

void CudaOps::prefetch(std::span<const Tensor> weights) {
  if (!device_.hopper() || timer_.on() || !cuda::side_stream_enabled() || !cuda::prefetch_enabled()) return;
  PrefetchSpans s;
  uint64_t pieces = 0;
  auto add = [&](const Tensor& t) {
    if (!t.defined() || t.device() != Device::CUDA || s.n == kPrefetchSpans) return;
    // Whole 16-byte units inside the tensor (bulk copies' alignment).
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.raw()) + 15) & ~uintptr_t(15);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(t.raw()) + t.nbytes()) & ~uintptr_t(15);
    if (end <= begin) return;
    s.base[s.n] = reinterpret_cast<const char*>(begin);
    s.bytes[s.n++] = end - begin;
    pieces += (end - begin + kPrefetchPiece - 1) / kPrefetchPiece;
  };
  for (const Tensor& w : weights) {
    add(w);
    if (w.defined() && w.dtype() == DType::F8_E4M3_B128) add(w.scales());
  }
  if (pieces == 0) return;
  const int grid = int(std::min<uint64_t>(uint64_t(device_.sms), (pieces + kPrefetchThreads - 1) / kPrefetchThreads));
  side([&] {
    cuda::launch(prefetch_l2_kernel, dim3(grid), dim3(kPrefetchThreads), 0, stream_, s);
    cuda::check_launch("prefetch");
  });
}

cublasHandle_t CudaOps::library_call() {
  join_side();  // (nothing from side work itself)
  cublas_on(stream_);
  return cublas_;
}

bool CudaOps::move_cublas(cudaStream_t stream) noexcept {
  // cublasSetStream drops the handle's workspace for cuBLAS's own pool, which a graph's capture
  // cannot allocate from: set it again.
  return cublasSetStream(cublas_, stream) == CUBLAS_STATUS_SUCCESS &&
         cublasSetWorkspace(cublas_, cublas_workspace_, cublas_workspace_bytes_) == CUBLAS_STATUS_SUCCESS;
}

void CudaOps::cublas_on(cudaStream_t stream) {
  if (cublas_stream_ == stream) return;
  check(move_cublas(stream), "cuBLAS: moving the handle to the {} stream failed",
        stream == main_stream_ ? "main" : "side");
  cublas_stream_ = stream;
}

CudaOpTimer::~CudaOpTimer() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

int CudaOpTimer::record() {
  if (used_ == events_.size()) {
    cudaEvent_t e;
    check_cuda(cudaEventCreate(&e), "op timing: cudaEventCreate");
    events_.push_back(e);
  }
  check_cuda(cudaEventRecord(events_[used_], stream_), "op timing: cudaEventRecord");
  return int(used_++);
}

std::vector<OpTime> CudaOpTimer::stop() {
  on_ = false;
  check_cuda(cudaStreamSynchronize(stream_), "op timing: stream");
  OpTimes times;
  for (const Span& s : spans_) {
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, events_[size_t(s.begin)], events_[size_t(s.end)]), "op timing: elapsed");
    times.add(s.op, double(ms) * 1e-3);
  }
  spans_.clear();
  used_ = 0;
  return times.take();
}

}  // namespace ballast::kernels
