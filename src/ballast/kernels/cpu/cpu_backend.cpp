#include "ballast/kernels/cpu/cpu_backend.h"

#include <cblas.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "ballast/core/clock.h"
#include "ballast/core/error.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/kernels/op_timing.h"

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

void CpuBackend::start_op_timing() {
  op_times_ = std::make_unique<OpTimes>();
  ops_->set_op_times(op_times_.get());
}

std::vector<OpTime> CpuBackend::stop_op_timing() {
  ops_->set_op_times(nullptr);
  if (!op_times_) return {};
  std::vector<OpTime> out = op_times_->take();
  op_times_.reset();
  return out;
}

Ceilings CpuBackend::measure_ceilings() {
  Ceilings c;
  // Copy: a parallel memcpy of 1 GiB, far past the caches; best of 5.
  const size_t bytes = size_t(1) << 30;
  std::vector<char> a(bytes, 1), b(bytes, 2);
  for (int r = 0; r < 5; ++r) {
    const double t0 = now_seconds();
    pool_.parallel_for(int64_t(bytes >> 20), [&](int64_t i0, int64_t i1) {
      std::memcpy(b.data() + (i0 << 20), a.data() + (i0 << 20), size_t(i1 - i0) << 20);
    });
    c.copy_bytes_per_s = std::max(c.copy_bytes_per_s, 2.0 * double(bytes) / seconds_since(t0));
  }
  // GEMM: C[n, n] = A B^T in fp32, row blocks over the pool (OpenBLAS one thread per call, as the
  // matmul op runs it); best of 3.
  const int n = 2048, block = 64;
  std::vector<float> A(size_t(n) * n, 0.5f), B(size_t(n) * n, 0.25f), C(size_t(n) * n);
  for (int r = 0; r < 3; ++r) {
    const double t0 = now_seconds();
    pool_.parallel_for(n / block, [&](int64_t b0, int64_t b1) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(b1 - b0) * block, n, n, 1.0f,
                  A.data() + size_t(b0) * block * n, n, B.data(), n, 0.0f, C.data() + size_t(b0) * block * n, n);
    });
    c.gemm_flops_per_s = std::max(c.gemm_flops_per_s, 2.0 * n * double(n) * n / seconds_since(t0));
  }
  c.gemm = fmt::format("OpenBLAS sgemm {}^3", n);
  return c;
}

}  // namespace ballast::kernels
