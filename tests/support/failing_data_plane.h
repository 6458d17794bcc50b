#pragma once
// Fault injection for tests: a data plane that does every transfer of the plane it wraps and then,
// where `fails` says so, reports the point-to-point moves as failed (as a transport error detected
// after the fact would), leaving the wrapped plane in a consistent state.
#include <functional>
#include <span>

#include "ballast/core/error.h"
#include "ballast/dist/data_plane.h"

namespace ballast::test {

class FailingDataPlane final : public dist::DataPlane {
 public:
  // fails(items): whether this rank's send_recv call over `items` is to fail.
  FailingDataPlane(dist::DataPlane& inner, std::function<bool(std::span<const Transfer>)> fails)
      : inner_(inner), fails_(std::move(fails)) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) override {
    inner_.all_to_all_v(send, send_counts, recv, recv_counts);
  }
  void all_gather(const Tensor& mine, Tensor& all) override { inner_.all_gather(mine, all); }
  void all_reduce_sum(Tensor& data) override { inner_.all_reduce_sum(data); }
  void send_recv(std::span<const Transfer> items) override {
    inner_.send_recv(items);
    if (fails_(items)) fail("injected transfer failure on rank {}", rank());
  }

 private:
  dist::DataPlane& inner_;
  std::function<bool(std::span<const Transfer>)> fails_;
};

}  // namespace ballast::test
