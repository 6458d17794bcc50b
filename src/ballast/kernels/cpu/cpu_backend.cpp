#include "ballast/kernels/cpu/cpu_backend.h"

#include <cblas.h>

#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/cpu_ops.h"

namespace ballast::kernels {

CpuBackend::CpuBackend(int threads) : pool_(threads) {
  // Parallelism comes from our pool; BLAS runs single-threaded inside each task.
  openblas_set_num_threads(1);
  ops_ = std::make_unique<CpuOps>(pool_, counters_);
}

CpuBackend::~CpuBackend() = default;

std::string CpuBackend::describe() const {
  return fmt::format("cpu, {} thread{}", pool_.size(), pool_.size() == 1 ? "" : "s");
}

Ops& CpuBackend::ops() { return *ops_; }

Tensor CpuBackend::alloc(std::vector<int64_t> shape, DType dtype) {
  int64_t numel = 1;
  for (int64_t d : shape) {
    check(d >= 0, "cpu alloc: negative dimension {}", d);
    numel *= d;
  }
  const size_t bytes = size_t(numel) * dtype_size(dtype);
  // 64-byte aligned (a cache line, any vector load); never null, so an empty tensor is defined.
  const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  check(p != nullptr, "cpu alloc: out of memory for {} bytes", rounded);
  ++counters_.allocations;
  counters_.bytes_allocated += int64_t(bytes);
  return Tensor::borrow(p, std::move(shape), dtype, Device::CPU, std::shared_ptr<void>(p, std::free));
}

Tensor CpuBackend::to_device(const Tensor& host) {
  check(host.device() == Device::CPU, "cpu to_device: tensor {} is not in host memory", host);
  return host;
}

void CpuBackend::upload(const void* host, Tensor& dst) {
  check(dst.device() == Device::CPU, "cpu upload: destination {} is not host memory", dst);
  if (dst.nbytes() > 0) std::memcpy(dst.raw(), host, dst.nbytes());
  ++counters_.uploads;
  counters_.bytes_uploaded += int64_t(dst.nbytes());
}

void CpuBackend::download(const Tensor& src, void* host) {
  check(src.device() == Device::CPU, "cpu download: source {} is not host memory", src);
  if (src.nbytes() > 0) std::memcpy(host, src.raw(), src.nbytes());
  ++counters_.downloads;
  counters_.bytes_downloaded += int64_t(src.nbytes());
}

}  // namespace ballast::kernels
