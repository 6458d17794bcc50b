// CudaOps: construction and the ops' shared scratch. The ops themselves are in cuda_*.cu by group.
#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_support.cuh"

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
    check_cuda(cudaMalloc(&data_, rounded), "scratch: cudaMalloc");
    size_ = rounded;
    ++counters_.memory_epoch;  // graphs captured before read the old buffer
    ++counters_.allocations;
    counters_.bytes_allocated += int64_t(rounded);
  }
  return data_;
}

CudaOps::CudaOps(Counters& counters, cudaStream_t stream, cublasHandle_t cublas)
    : counters_(counters), stream_(stream), cublas_(cublas), scratch_(counters, stream) {}

}  // namespace ballast::kernels
