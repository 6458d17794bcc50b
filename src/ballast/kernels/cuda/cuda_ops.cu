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

CudaOps::CudaOps(Counters& counters, const CudaDeviceTraits& device, cudaStream_t stream, cublasHandle_t cublas,
                 bool bf16_matmul)
    : counters_(counters),
      device_(device),
      stream_(stream),
      cublas_(cublas),
      bf16_matmul_(bf16_matmul),
      scratch_(counters, stream),
      timer_(stream),
      smem_(device.smem_optin) {}

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
