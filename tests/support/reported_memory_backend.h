#pragma once
// A backend that reports a device of fixed size: `free` bytes free when it was made, less what it
// has allocated since (the wrapped backend's counters) and not given back (of what it allocated
// through alloc(): the state cache, the workspace), of `total`; everything else is the wrapped
// backend's. Budgets computed from it are exact whatever else runs on the host (the host's free
// memory moves with every other process). It captures no graphs (its counters, which graphs
// check, are not the wrapped backend's).
#include <memory>
#include <string>
#include <vector>

#include "ballast/kernels/backend.h"

namespace ballast::test {

class ReportedMemoryBackend final : public kernels::Backend {
 public:
  ReportedMemoryBackend(std::unique_ptr<kernels::Backend> inner, int64_t free, int64_t total)
      : inner_(std::move(inner)), free_(free), total_(total), allocated_(inner_->counters().bytes_allocated) {}

  kernels::MemoryInfo memory() const override {
    last_ = {free_ - (inner_->counters().bytes_allocated - allocated_) + *freed_, total_};
    return last_;
  }
  // What memory() last reported.
  kernels::MemoryInfo last_reported() const { return last_; }

  Device device() const override { return inner_->device(); }
  std::string describe() const override { return inner_->describe(); }
  kernels::Ops& ops() override { return inner_->ops(); }
  Tensor alloc(std::vector<int64_t> shape, DType dtype) override {
    Tensor t = inner_->alloc(std::move(shape), dtype);
    if (dtype == DType::F8_E4M3_B128) return t;  // (its scales would not survive a view: kept as allocated)
    // The same buffer, whose last view going counts its bytes as given back.
    auto owner = std::shared_ptr<void>(new Tensor(t), [freed = freed_](void* p) {
      auto* held = static_cast<Tensor*>(p);
      *freed += int64_t(held->storage_bytes());
      delete held;
    });
    return Tensor::borrow(t.raw(), t.shape(), t.dtype(), t.device(), std::move(owner));
  }
  Tensor to_device(const Tensor& host) override { return inner_->to_device(host); }
  void upload(const void* host, Tensor& dst) override { inner_->upload(host, dst); }
  void download(const Tensor& src, void* host) override { inner_->download(src, host); }
  void synchronize() override { inner_->synchronize(); }
  void* stream() const override { return inner_->stream(); }
  void start_op_timing() override { inner_->start_op_timing(); }
  std::vector<kernels::OpTime> stop_op_timing() override { return inner_->stop_op_timing(); }
  kernels::Ceilings measure_ceilings() override { return inner_->measure_ceilings(); }
  DType kv_cache_dtype() const override { return inner_->kv_cache_dtype(); }

 private:
  std::unique_ptr<kernels::Backend> inner_;
  int64_t free_, total_, allocated_;
  std::shared_ptr<int64_t> freed_ = std::make_shared<int64_t>(0);  // outlives this while buffers do
  mutable kernels::MemoryInfo last_;
};

}  // namespace ballast::test
