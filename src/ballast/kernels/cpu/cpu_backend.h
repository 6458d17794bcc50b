#pragma once
// The reference backend: host memory, fp32 arithmetic, every op parallel over one ThreadPool.
// The device is this process's memory: an upload or download is a memcpy (still counted, as on
// any device). Weights are copied into memory of the process's own (to_device) by default, or
// read in place from the checkpoint's mapping (CpuOptions::copy_weights = false: no second copy,
// for a model that barely fits). Measured on a 2-vCPU virtual machine: products read file-backed
// pages 1.5x (prefill) slower than anonymous ones, and the host may page them out under a run
// (docs/perf.md).
#include <memory>

#include "ballast/core/thread_pool.h"
#include "ballast/kernels/backend.h"

namespace ballast::kernels {

class CpuOps;
class OpTimes;

struct CpuOptions {
  bool copy_weights = true;  // false: to_device returns the host (mmapped) view itself
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads, CpuOptions options = {});  // threads 0 = every core
  ~CpuBackend() override;

  Device device() const override { return Device::CPU; }
  std::string describe() const override;
  Ops& ops() override;

  Tensor alloc(std::vector<int64_t> shape, DType dtype) override;
  Tensor to_device(const Tensor& host) override;
  void upload(const void* host, Tensor& dst) override;
  void download(const Tensor& src, void* host) override;
  void synchronize() override {}
  void start_op_timing() override;
  std::vector<OpTime> stop_op_timing() override;
  Ceilings measure_ceilings() override;
  MemoryInfo memory() const override;

  ThreadPool& pool() { return pool_; }

 private:
  // Weights' memory: blocks of at least 64 MiB asked for as transparent huge pages (a decode step
  // streams them: fewer TLB misses), handed out in order.
  struct WeightArena;
  std::unique_ptr<WeightArena> weights_;
  ThreadPool pool_;
  CpuOptions options_;
  // The weights to_device has handed out, against the last-level cache: past it they stream from
  // memory at every pass (CpuOps::set_weights_stream).
  int64_t weight_bytes_ = 0;
  int64_t cache_bytes_ = 0;
  std::unique_ptr<CpuOps> ops_;
  std::unique_ptr<OpTimes> op_times_;  // while timing is on
};

}  // namespace ballast::kernels
