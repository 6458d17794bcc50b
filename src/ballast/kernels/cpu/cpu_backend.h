#pragma once
// The reference backend: host memory, fp32 arithmetic, every op parallel over one ThreadPool.
// The device is this process's memory, so weights are read in place (to_device returns the
// mmapped view) and an upload or download is a memcpy (still counted, as on any device).
#include <memory>

#include "ballast/core/thread_pool.h"
#include "ballast/kernels/backend.h"

namespace ballast::kernels {

class CpuOps;
class OpTimes;

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads);  // 0 = every core
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

  ThreadPool& pool() { return pool_; }

 private:
  ThreadPool pool_;
  std::unique_ptr<CpuOps> ops_;
  std::unique_ptr<OpTimes> op_times_;  // while timing is on
};

}  // namespace ballast::kernels
