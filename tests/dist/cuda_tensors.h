#pragma once
// Tensors in GPU memory for the NCCL data plane's test and bench: a copy of a host tensor in the
// calling thread's current device, freed with the tensor, and a host copy of one back.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <memory>

#include "ballast/core/error.h"
#include "ballast/core/tensor.h"

namespace ballast::test {

inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(fmt::format("{}: {}", what, cudaGetErrorString(e)));
}

inline Tensor to_cuda(const Tensor& host) {
  void* p = nullptr;
  cuda_ok(cudaMalloc(&p, std::max<size_t>(host.nbytes(), 1)), "cudaMalloc");
  if (host.nbytes()) cuda_ok(cudaMemcpy(p, host.raw(), host.nbytes(), cudaMemcpyHostToDevice), "upload");
  return Tensor::borrow(p, host.shape(), host.dtype(), Device::CUDA, std::shared_ptr<void>(p, cudaFree));
}

// Waits for the device (cudaMemcpy: the plane's streams are blocking ones).
inline Tensor to_host(const Tensor& t) {
  Tensor host = Tensor::zeros(t.shape(), t.dtype());
  if (t.nbytes()) cuda_ok(cudaMemcpy(host.raw(), t.raw(), t.nbytes(), cudaMemcpyDeviceToHost), "download");
  return host;
}

}  // namespace ballast::test
