#include "ballast/kernels/cpu/cpu_backend.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cblas.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "ballast/core/clock.h"
#include "ballast/core/error.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/kernels/cpu/matmul.h"
#include "ballast/kernels/op_timing.h"

namespace ballast::kernels {

struct CpuBackend::WeightArena {
  static constexpr size_t kBlock = size_t(64) << 20, kHuge = size_t(2) << 20;
  std::vector<std::shared_ptr<void>> blocks;
  char* next = nullptr;
  size_t left = 0, last_block = 0;

  // 64-byte aligned room for `bytes`, and the block that owns it.
  std::pair<void*, std::shared_ptr<void>> take(size_t bytes) {
    const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
    if (rounded > left) {
      const size_t size = (std::max(rounded, kBlock) + kHuge - 1) / kHuge * kHuge;
      void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      check(p != MAP_FAILED, "cpu to_device: out of memory for {} bytes of weights", size);
      madvise(p, size, MADV_HUGEPAGE);  // a hint: without it (or THP off) 4 KiB pages
      blocks.emplace_back(p, [size](void* q) { munmap(q, size); });
      next = static_cast<char*>(p);
      left = last_block = size;
    }
    void* p = next;
    next += rounded;
    left -= rounded;
    return {p, blocks.back()};
  }
};

CpuBackend::CpuBackend(int threads, CpuOptions options)
    : weights_(std::make_unique<WeightArena>()), pool_(threads), options_(options) {
  // Parallelism comes from our pool; BLAS runs single-threaded inside each task.
  openblas_set_num_threads(1);
  ops_ = std::make_unique<CpuOps>(pool_, counters_);
  // The last-level cache as the system reports it (on a virtual machine possibly the sum over
  // the host's cache complexes, larger than one core's share: weights past it stream for sure).
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  cache_bytes_ = l3 > 0 ? l3 : l2 > 0 ? l2 : int64_t(32) << 20;
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
  // Block-scaled FP8: the elements and their scales, each copied once (and counted below).
  if (options_.copy_weights && host.dtype() == DType::F8_E4M3_B128)
    return Tensor::block_scaled(to_device(host.elements()), to_device(host.scales()));
  weight_bytes_ += int64_t(host.storage_bytes());
  ops_->set_weights_stream(weight_bytes_ > cache_bytes_);
  if (!options_.copy_weights) return host;
  auto [p, block] = weights_->take(host.nbytes());
  if (block.get() == p) {  // a new block
    ++counters_.allocations;
    counters_.bytes_allocated += int64_t(weights_->last_block);
  }
  Tensor t = Tensor::borrow(p, host.shape(), host.dtype(), Device::CPU, std::move(block));
  upload(host.raw(), t);
  return t;
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

MemoryInfo CpuBackend::memory() const {
  // /proc/meminfo's MemAvailable (the kernel's estimate of what can be had without swapping);
  // where it cannot be read, the free pages.
  MemoryInfo m;
  m.total_bytes = int64_t(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  m.free_bytes = int64_t(sysconf(_SC_AVPHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  if (std::FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    long long kib = 0;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "MemAvailable: %lld kB", &kib) == 1) {
        m.free_bytes = int64_t(kib) * 1024;
        break;
      }
    std::fclose(f);
  }
  return m;
}

namespace {

// Built with AddressSanitizer (the test suite's sanitized stage): the ceilings mean nothing there,
// and at full size they took ~40 s of every bench run (the instrumented bf16 product above all):
// the same code over small buffers.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

}  // namespace

Ceilings CpuBackend::measure_ceilings() {
  Ceilings c;
  // Copy: a parallel memcpy of 1 GiB, far past the caches; best of 5.
  const size_t bytes = size_t(1) << (kSanitized ? 24 : 30);
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
  const int n = kSanitized ? 256 : 2048, block = 64;
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
  // The same product with bf16 weights through ballast's own kernel (matmul.cpp, AVX-512 where the
  // CPU has it): where the library's build does not know the CPU (Debian's OpenBLAS runs its AVX2
  // kernels on Zen 5), it is the faster of the two, and the ceiling is the faster.
  Tensor w = Tensor::zeros({n, n}, DType::BF16);
  std::fill_n(w.data<uint16_t>(), int64_t(n) * n, f32_to_bf16(0.25f));
  for (int r = 0; r < 3; ++r) {
    const double t0 = now_seconds();
    cpu::matmul(A.data(), n, n, w, C.data(), &pool_);
    const double rate = 2.0 * n * double(n) * n / seconds_since(t0);
    if (rate > c.gemm_flops_per_s) {
      c.gemm_flops_per_s = rate;
      c.gemm = fmt::format("ballast bf16 product {}^3", n);
    }
  }
  return c;
}

}  // namespace ballast::kernels
