// CudaOps: construction and the ops' shared scratch. The ops themselves are in cuda_*.cu by group.
#include "ballast/kernels/cuda/cuda_ops.h"
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
